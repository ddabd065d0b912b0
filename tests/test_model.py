import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conftest import hf_config
from mlm.model.build import MaskedLMLoss, build_model
from mlm.model.families import BERT_SIZES
from mlm.tokenizer import load_tokenizer


@pytest.mark.parametrize("size", list(BERT_SIZES))
def test_presets(tokenizer_dirs, size):
    cfg = hf_config("bert", size, load_tokenizer(tokenizer_dirs["bert"]))
    layers, hidden = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768),
                      "large": (24, 1024)}[size]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (layers, hidden, 4 * hidden)
    assert cfg.num_attention_heads == max(2, hidden // 64)


def test_exported_checkpoint_gives_the_same_logits_in_plain_transformers(tokenizer_dirs, family, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dirs[family])
    model = build_model(hf_config(family, "tiny", tokenizer, max_positions=64), seed=0)
    # Move the weights away from their initial values so the comparison is not of a fresh init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer(["The cat sees a red ball. The team builds the new house."], return_tensors="pt")["input_ids"]
    positions = torch.tensor([[1, 3, 5]])
    model.eval()
    ours = MaskedLMLoss(model)
    ours_logits = ours.logits(ids, positions)

    loaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    theirs = loaded(input_ids=ids).logits[:, positions[0]]
    torch.testing.assert_close(ours_logits, theirs, rtol=1e-5, atol=1e-5)
    labels = ids.gather(1, positions)
    loss = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(ours(ids, positions, labels), loss, rtol=1e-5, atol=1e-5)

    # The other entry points a user reaches for load it too, with no mlm code involved.
    classifier = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3)
    assert classifier(input_ids=ids).logits.shape == (1, 3)
    fill = pipeline("fill-mask", model=str(tmp_path), device="cpu")
    assert len(fill(f"The cat sees a {tokenizer.mask_token} ball.", top_k=3)) == 3
    assert len(AutoTokenizer.from_pretrained(str(tmp_path))) == len(tokenizer)


def test_the_compiled_training_forward_gives_attention_no_mask(tokenizer_dirs, family):
    """Training windows are never padded: every SDPA call in the compiled training graph has no mask, so the
    flash kernel can run (it refuses any mask). transformers 5.17 builds an all-True mask inside a compiled
    graph where later versions give None; the training attention must not pass it on under either."""
    from mlm.model.build import install_training_attention

    model = build_model(hf_config(family, "tiny", load_tokenizer(tokenizer_dirs[family]), max_positions=64), seed=0)
    install_training_attention(model)
    loss_model = MaskedLMLoss(model).train()
    calls = []

    def inspect_graph(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                calls.append(node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None))
        return graph_module.forward

    ids = torch.randint(5, model.config.vocab_size, (2, 32))
    positions = torch.rand(2, 32).topk(5, dim=1).indices
    try:
        torch.compile(loss_model, backend=inspect_graph, fullgraph=True)(ids, positions, ids.gather(1, positions))
    finally:
        torch._dynamo.reset()
    assert len(calls) == model.config.num_hidden_layers
    assert calls == [None] * len(calls)
