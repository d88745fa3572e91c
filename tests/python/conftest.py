import pytest
import torch


def realistic_activations(tokens: int, n: int, seed: int, sample_seed: int = 0, n_outliers: int = 4) -> torch.Tensor:
    """Correlated activations with a per-channel offset and a few ~20x outlier channels.

    `seed` fixes the distribution, `sample_seed` the tokens drawn from it.
    """
    g = torch.Generator().manual_seed(seed)
    r = max(4, n // 4)
    mix = torch.randn(r, n, generator=g) / torch.sqrt(1.0 + torch.arange(r, dtype=torch.float32)).unsqueeze(1)
    offset = 0.3 * torch.randn(n, generator=g)
    scale = torch.ones(n)
    scale[torch.randint(0, n, (n_outliers,), generator=g)] = 20.0
    gs = torch.Generator().manual_seed(1000 + sample_seed)
    X = torch.randn(tokens, r, generator=gs) @ mix
    return scale * (X + offset + 0.1 * torch.randn(tokens, n, generator=gs))


def realistic_weights(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row = 0.02 * torch.exp(0.3 * torch.randn(m, 1, generator=g))
    return row * torch.randn(m, n, generator=g) * torch.exp(0.25 * torch.randn(m, n, generator=g))


@pytest.fixture
def layer():
    n, m = 256, 96
    X = realistic_activations(2048, n, seed=1)
    W = realistic_weights(m, n, seed=2)
    return W, X


def tiny_llama_dir(folder, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    """A random LLaMA model with SmolLM2's tokenizer, saved as an HF folder."""
    import transformers as tf

    from normtweak.models import load_model

    _, tok = load_model("smollm2-135m")
    cfg = tf.LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=intermediate)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
