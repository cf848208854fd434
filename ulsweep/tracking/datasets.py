"""What a run trained and was evaluated on, as MLflow dataset inputs (the UI's Dataset column).

Each input is one split of a dataset (or the latents of one), named `<dataset>:<split>` (latents:
`latents:<dataset>:<split>`), with the content hash as digest, the URI as source, the tag
`mlflow.data.context` = training | evaluation, and a profile (JSON) holding the full hash, the split and
its size. MLflow keeps at most 36 characters of a digest (`MAX_DATASET_DIGEST_SIZE`; a longer one is
refused, not cut), so the digest is the hash's first 36 hex digits and the profile holds all 64.
One entry per name and digest and run: logging again (a resumed trial) adds nothing.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

from ulsweep.tracking.redact import redact_uri

DIGEST_CHARS = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT


@dataclass(frozen=True)
class DatasetRef:
    """One dataset input of a run."""

    name: str
    content_hash: str  # 64 hex digits
    uri: str  # where it is stored (local path or URI)
    context: str  # "training" | "evaluation"
    profile: dict = field(default_factory=dict)  # JSON values shown as the dataset's profile

    @property
    def digest(self) -> str:
        return self.content_hash[:DIGEST_CHARS]


UNIQUE_RETRIES = 5  # log_inputs attempts when another run inserted the same dataset at the same moment


def split_refs(ds, train_split: str, eval_split: str, image_size: int) -> list[DatasetRef]:
    """The training and evaluation splits of an opened dataset (`ulsweep.data.Dataset`)."""
    out = []
    for split, context in ((train_split, "training"), (eval_split, "evaluation")):
        out.append(DatasetRef(f"{ds.name}:{split}", ds.content_hash, ds.uri, context,
                              {"split": split, "num_images": ds.splits[split], "image_shape": list(ds.image_shape),
                               "image_size": image_size, "content_hash": ds.content_hash}))
    return out


def latents_ref(latents, dataset_name: str) -> DatasetRef:
    """The training latents of a base model (`ulsweep.train.latents.Latents`)."""
    m = latents.manifest
    return DatasetRef(f"latents:{dataset_name}:{m['split']}", latents.content_hash, latents.uri, "training",
                      {"split": m["split"], "num_rows": m["num_rows"], "latent_shape": m["latent_shape"],
                       "dtype": m["dtype"], "content_hash": latents.content_hash, "ae_sha256": m["ae_sha256"],
                       "data_hash": m["data_hash"]})


def _source(uri: str) -> tuple[str, str]:
    """(source type, source JSON) as MLflow's own dataset sources write them ("local", "s3", "gs", ...);
    the scheme for a URI MLflow has no source for (memory://)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
            src = resolve_dataset_source(uri)
        return src._get_source_type(), src.to_json()
    except MlflowException:
        return uri.split("://", 1)[0], json.dumps({"uri": uri})


def to_input(ref: DatasetRef):
    """The `mlflow.entities.DatasetInput` of a ref."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source = _source(redact_uri(ref.uri))
    ds = Dataset(name=ref.name, digest=ref.digest, source_type=source_type, source=source,
                 profile=json.dumps(ref.profile, sort_keys=True))
    return DatasetInput(ds, tags=[InputTag(CONTEXT_TAG, ref.context)])


def log_dataset_inputs(c, run_id: str, refs: list[DatasetRef]) -> int:
    """Log the refs the run does not list yet; returns how many were new."""
    from ulsweep.tracking.runs import retry

    have = {(d.dataset.name, d.dataset.digest) for d in retry(c.get_run, run_id).inputs.dataset_inputs}
    new = [to_input(r) for r in refs if (r.name, r.digest) not in have]
    for attempt in range(UNIQUE_RETRIES):
        if not new:
            break
        try:
            retry(c.log_inputs, run_id, datasets=new)
            break
        except Exception as e:  # noqa: BLE001 - the SQL stores raise their drivers' IntegrityError
            # two trials of one experiment logging the same dataset at once: the second insert of the shared
            # dataset row violates its unique key; once the first has committed, logging links to that row
            if "unique" not in str(e).lower() or attempt == UNIQUE_RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return len(new)
