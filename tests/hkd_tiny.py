"""The tiny CIF-HKD model of the model, step and bank tests, defined once."""

from cifhkd import model as M

VOCAB, TEACHER_DIM = 23, 16


def tiny_config(**overrides) -> M.ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        teacher_dim=TEACHER_DIM,
        d_model=32,
        num_heads=4,
        ffn_dim=64,
        num_layers=3,
        pool_after=(1, 2),
        conv_kernel=5,
        subsampling_channels=8,
        decoder_layers=1,
        decoder_heads=4,
        decoder_ffn_dim=64,
    )
    base.update(overrides)
    return M.ModelConfig(**base)
