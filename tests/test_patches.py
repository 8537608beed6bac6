"""The Megatron-LM patch applies to a checkout at core_v0.16.1 ($MEGATRON_LM_DIR; skipped
without it): `git apply --check` on a scratch copy of the files it touches (the checkout is
never modified)."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import MEGATRON_LM_DIR, REPO, megatron_lm_missing

PATCH_DIR = os.path.join(REPO, "patches")
PATCHES = sorted(os.path.join(PATCH_DIR, n) for n in os.listdir(PATCH_DIR) if n.endswith(".patch"))


def _touched(patch: str) -> list:
    return sorted(set(re.findall(r"^\+\+\+ b/(\S+)", open(patch).read(), re.M)))


def test_patches_exist_and_are_documented():
    assert PATCHES, "patches/ holds no .patch file"
    readme = open(os.path.join(PATCH_DIR, "README.md")).read()
    for patch in PATCHES:
        assert os.path.basename(patch) in readme
        text = open(patch).read()
        assert "megatron_sparkling.install()" in text
        assert "megatron_sparkling.extra_args_provider(" in text


@pytest.mark.skipif(megatron_lm_missing() is not None, reason=megatron_lm_missing() or "")
@pytest.mark.parametrize("patch", PATCHES, ids=os.path.basename)
def test_patch_applies_to_the_megatron_lm_checkout(patch, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    copy = tmp_path / "mlm"
    for rel in _touched(patch):
        os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(MEGATRON_LM_DIR, rel), copy / rel)
    check = subprocess.run(["git", "apply", "--check", "-v", patch], cwd=copy,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", patch], cwd=copy, check=True)
    for rel in _touched(patch):
        if rel.endswith(".py"):   # the patched file is still valid Python
            compile(open(copy / rel).read(), rel, "exec")
