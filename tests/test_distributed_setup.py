"""Process set-up before DeepSpeed loads: a killed JIT build's lock must not hang later runs."""
import os
import time

import pytest

from flowpre.train import distributed


def _lock(folder, age_s):
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_build_locks_go_and_fresh_ones_stay(tmp_path):
    stale_env_layout = _lock(tmp_path / "deepspeed_shm_comm", 3600)      # TORCH_EXTENSIONS_DIR/<op>/lock
    stale_default_layout = _lock(tmp_path / "py311_cpu" / "cpu_adam", 1000)  # default root/py311_cpu/<op>/lock
    building_now = _lock(tmp_path / "fused_adam", 30)
    with pytest.warns(UserWarning, match="was killed") as caught:
        removed = distributed.remove_stale_build_locks(tmp_path)
    assert sorted(removed) == sorted([stale_env_layout, stale_default_layout]) and len(caught) == 2
    assert not stale_env_layout.exists() and not stale_default_layout.exists() and building_now.exists()
    said = " ".join(str(w.message) for w in caught)
    assert f"{stale_env_layout}: a JIT build lock left 60 min ago" in said and str(stale_default_layout) in said


def test_prepare_environment_clears_the_lock_of_the_extension_folder_in_use(tmp_path, monkeypatch):
    stale = _lock(tmp_path / "deepspeed_shm_comm", 2 * distributed.STALE_BUILD_LOCK_S)
    # prepare_environment writes os.environ itself: a copy keeps this process's own intact
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="killed"):
        distributed.prepare_environment()
    assert not stale.exists() and os.environ["WORLD_SIZE"] == "1"
