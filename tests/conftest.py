import pytest
import torch

from chunkflow.models import ModelConfig, Transformer


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these)")
    for item in items:
        if item.get_closest_marker("gpu"):  # the mark (tests/gpu's CPU instances have none)
            item.add_marker(skip)


def tiny_model(*, seed: int = 0, dtype=torch.float64, **overrides) -> Transformer:
    """A 2-layer GQA Qwen2-style model (q/k/v biases) small enough for float64 tests."""
    fields = dict(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, model_type="qwen2",
                  rope_theta=500.0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**fields)).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def reference_loss(model, batch, normalization: str = "token") -> torch.Tensor:
    """Plain unchunked training: each sequence through the model whole, HF-style shifted labels."""
    terms = []
    for item in batch:
        ids = item["input_ids"] if isinstance(item, dict) else item
        labels = item.get("labels", ids) if isinstance(item, dict) else ids
        logits = model(ids[None])[0]
        targets = labels[1:]
        ce = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none",
                                               ignore_index=-100)
        terms.append((ce, targets != -100))
    if normalization == "token":
        return sum((ce * m).sum() for ce, m in terms) / sum(m.sum() for _, m in terms)
    kept = [(ce, m) for ce, m in terms if m.any()]
    return sum((ce * m).sum() / m.sum() for ce, m in kept) / len(kept)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}
