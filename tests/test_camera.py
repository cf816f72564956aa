"""Camera-aware SSML-FD (the ``camera:`` section) and the oracle ceiling (``mining.oracle``)."""

from __future__ import annotations

import os

from test_train import final_json, train_cli

# The digests of test_train's SMALL run on the conftest data, recorded on 2026-12-04 from the code before the
# camera section existed (commit 00bc2d6). Float results depend on the kernels a library picks for the CPU and
# on the thread count, so the run pins both to what any x86-64 machine since 2013 runs alike (AVX2, 2 threads).
PINNED_CPU = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
RECORDED = {
    "weights_sha256": "e5653f4178bca1b0f96cd30ce0ec50a67a9554435e7e5b29edf0e2acfcc8b36a",
    "dictionary_sha256": "5b7d709ba93f77d5db45b388abe9701439d5c82c85d4a0ae892c8beebfdcad14",
}


def test_camera_agnostic_training_keeps_the_recorded_digests(shard_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU} | PINNED_CPU
    report = final_json(train_cli(shard_root, tmp_path / "store", env=env))
    assert {k: report[k] for k in RECORDED} == RECORDED
