"""Test and benchmark support that ships with the package because sweeps run it: fault points (faults.py),
stand-in training loops with the real loops' contract (fake.py)."""
