import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ostinato.config import ModelConfig, load_config
from ostinato.model.llama import LOSS_CHUNK_TOKENS, KVCache, Llama, count_parameters, head_loss

pytestmark = pytest.mark.timeout(60)


def small_model(**changes) -> Llama:
    cfg = load_config(None, [f"model.{k}={v}" for k, v in changes.items()]).model
    model = Llama(cfg)
    model.init_weights(0)
    return model


def test_parameter_names_and_shapes_are_those_of_hf_llama():
    model = small_model(size='"tiny"')
    cfg: ModelConfig = model.cfg
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    kv = cfg.n_kv_heads * cfg.head_dim
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.dim)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (cfg.dim, cfg.dim)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, cfg.dim)
    assert shapes["model.layers.0.self_attn.v_proj.weight"] == (kv, cfg.dim)
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == (cfg.ffn_dim, cfg.dim)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (cfg.dim, cfg.ffn_dim)
    assert shapes["model.layers.1.post_attention_layernorm.weight"] == (cfg.dim,)
    assert shapes["model.norm.weight"] == (cfg.dim,)
    assert shapes["lm_head.weight"] == (cfg.vocab_size, cfg.dim)
    assert len(shapes) == 3 + 9 * cfg.n_layers


def test_forward_shapes_and_loss():
    model = small_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 11))
    assert model(tokens).shape == (3, 11, model.cfg.vocab_size)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.dim() == 0
    # An untrained model is close to uniform over the vocabulary.
    assert abs(float(loss) - torch.log(torch.tensor(float(model.cfg.vocab_size)))) < 0.5


def test_kv_cache_decoding_matches_full_forward():
    model = small_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    full = model(tokens)
    caches = [KVCache() for _ in range(model.cfg.n_layers)]
    parts = [model(tokens[:, :7], caches=caches)]
    for t in range(7, 12):
        parts.append(model(tokens[:, t : t + 1], positions=torch.tensor([t]), caches=caches))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_tensor():
    model = small_model(tie_embeddings="true")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = small_model()
    assert count_parameters(untied) - count_parameters(model) == untied.lm_head.weight.numel()


def test_gradients_match_finite_differences():
    model = small_model(
        dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=32, n_layers=1
    ).double()
    tokens = torch.randint(0, 32, (2, 6))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(*chosen):
        # the layers' gradients through logits: the chunked loss head precomputes its
        # gradients once and so cannot be differentiated twice, as gradcheck does
        values = {**params, **dict(zip(names, chosen, strict=True))}
        logits = functional_call(model, values, (tokens[:, :-1],))
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    inputs = tuple(params[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "tokens",
    [LOSS_CHUNK_TOKENS, 3 * LOSS_CHUNK_TOKENS + 5],  # one chunk (plain path); several, ragged
)
def test_chunked_loss_head_equals_logits_then_cross_entropy(tokens):
    """The training loss never holds all logits at once (head_loss, LOSS_CHUNK_TOKENS rows at a
    time) yet is the same function: value and gradients agree with the logits computed whole.
    In float64 the two differ only by summation order, ~1e-16 relative; 1e-12 leaves room."""
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
    head = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (tokens,))
    targets[::7] = -100  # ignored positions, as padding is
    chunked = head_loss(hidden, head, targets)
    chunked_grads = torch.autograd.grad(chunked, (hidden, head))
    whole = F.cross_entropy(hidden @ head.T, targets, ignore_index=-100)
    whole_grads = torch.autograd.grad(whole, (hidden, head))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    for ours, theirs in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
