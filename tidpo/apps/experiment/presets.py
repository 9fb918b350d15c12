"""Methods and presets of the token-weighting experiment (``tidpo experiment``).

Every method trains from the same SFT model, with the same data order, steps, learning rate, β, batch size
and seed; only the method's own knobs (the papers' defaults) differ. See :data:`METHODS`.

Presets (:data:`PRESETS`):

- ``smoke``: the test suite's end-to-end run (tiny task and model, 1 seed, noise 0 and 0.4, every method,
  a few steps); < 1 minute on 2 cores. Its numbers mean nothing.
- ``reduced`` (default): every method × 3 seeds × noise 0 / 0.2 / 0.4 on the default task
  (4 topics, 40 words, 512 training / 128 held-out pairs); 7.6 minutes measured on 2 CPU cores for the 14
  methods before the two attribution targets were added (about 9 with them; limit 20).
- ``full``: 5 seeds, 1,024 training / 256 held-out pairs, more pretraining and preference steps, a wider
  model; estimated 1–2 hours on 2 cores (not measured, not run in CI).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["METHODS", "METHOD_LABELS", "PRESETS", "TIS_WEIGHTINGS", "TI_VARIANTS", "ExperimentConfig",
           "make_config"]

#: Every method of the experiment, in table order.
METHODS: tuple[str, ...] = (
    "sft",                # SFT on the chosen responses (the init and reference of every other run)
    "dpo",                # DPO (sigmoid), beta
    "tdpo2",              # TDPO2, alpha 0.5
    "tis_dpo_p",          # TIS-DPO, weights from the prompt pair: base model with "<good> x" vs "<bad> x"
    "tis_dpo_s",          # TIS-DPO, weights from SFT(chosen) vs SFT(rejected)
    "tis_dpo_d",          # TIS-DPO, weights from DPO vs DPO on the swapped pairs
    "tis_dpo_oracle",     # TIS-DPO, weights from the hidden token reward
    "tis_dpo_uniform",    # TIS-DPO, all weights 1 (= DPO without the EOS term)
    "tis_dpo_random",     # TIS-DPO, weights uniform in [0.7, 1.3]
    "ti_dpo",             # TI-DPO, paper defaults (gamma 0.1, lambda 0.7, sigma n/4)
    "ti_dpo_no_triplet",  # TI-DPO with gamma 0 (no anchor, no triplet term)
    "ti_dpo_no_prior",    # TI-DPO with lambda 1 (gradient importance only, no Gaussian prior)
    "ti_dpo_uniform",     # TI-DPO with every token weight 1 (triplet term kept)
    "ti_dpo_random",      # TI-DPO with U(0, 1) scores rescaled to mean 1 instead of the attribution
    "ti_dpo_sequence_logp",  # TI-DPO attributing the response's log-probability instead of the top logit
    "ti_dpo_log_ratio",   # TI-DPO attributing the response's log-ratio to the reference
)
#: Short names used in tables and plots.
METHOD_LABELS: dict[str, str] = {
    "sft": "SFT", "dpo": "DPO", "tdpo2": "TDPO2", "tis_dpo_p": "TIS-DPO(P)", "tis_dpo_s": "TIS-DPO(S)",
    "tis_dpo_d": "TIS-DPO(D)", "tis_dpo_oracle": "TIS-DPO(oracle)", "tis_dpo_uniform": "TIS-DPO(uniform)",
    "tis_dpo_random": "TIS-DPO(random)", "ti_dpo": "TI-DPO", "ti_dpo_no_triplet": "TI-DPO(no triplet)",
    "ti_dpo_no_prior": "TI-DPO(no prior)", "ti_dpo_uniform": "TI-DPO(uniform)", "ti_dpo_random": "TI-DPO(random)",
    "ti_dpo_sequence_logp": "TI-DPO(seq. log-prob)", "ti_dpo_log_ratio": "TI-DPO(log-ratio)",
}
#: TIS-DPO method -> the weighting it trains on.
TIS_WEIGHTINGS: dict[str, str] = {
    "tis_dpo_p": "P", "tis_dpo_s": "S", "tis_dpo_d": "D", "tis_dpo_oracle": "oracle",
    "tis_dpo_uniform": "uniform", "tis_dpo_random": "random",
}
#: TI-DPO method -> its config overrides (everything else is the paper's default of TokenWeightedDPOConfig).
TI_VARIANTS: dict[str, dict] = {
    "ti_dpo": {},
    "ti_dpo_no_triplet": {"gamma": 0.0},
    "ti_dpo_no_prior": {"ti_lambda": 1.0},
    "ti_dpo_uniform": {"ti_importance": "uniform"},
    "ti_dpo_random": {"ti_importance": "random"},
    "ti_dpo_sequence_logp": {"ti_attribution_target": "sequence_logp"},
    "ti_dpo_log_ratio": {"ti_attribution_target": "log_ratio"},
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment run (saved in ``results.json``).

    Task: the :class:`~tidpo.apps.experiment.task.TaskConfig` fields but ``noise`` and ``seed`` (those come from
    :attr:`noise_levels` and :attr:`seeds`). Model: a ``LlamaForCausalLM`` of :attr:`hidden_size` ×
    :attr:`num_layers`. Training: pretraining of the base LM (plain causal LM on ``pretrain_rows`` rows),
    SFT (``sft_steps`` at ``sft_lr``) and every preference run (``steps`` at ``lr``), all batches of
    ``batch_size`` pairs / rows, AdamW, constant learning rate.
    """

    preset: str = "reduced"
    seeds: tuple[int, ...] = (0, 1, 2)
    noise_levels: tuple[float, ...] = (0.0, 0.2, 0.4)
    methods: tuple[str, ...] = METHODS
    workers: int = 2
    # task (TaskConfig fields)
    num_topics: int = 4
    num_words: int = 40
    keys_per_topic: int = 8
    key_density: float = 0.25
    min_response_length: int = 6
    max_response_length: int = 12
    context_length: int = 2
    num_train: int = 512
    num_heldout: int = 128
    # model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # base-model pretraining
    pretrain_rows: int = 4096
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # SFT (init and reference of the preference runs)
    sft_steps: int = 100
    sft_lr: float = 1e-3
    # preference runs (shared by every method)
    steps: int = 150
    lr: float = 2e-4
    beta: float = 0.1
    batch_size: int = 16
    # evaluation
    eval_every: int = 25             # reward-vs-step curve: every N steps (step 0 included)
    curve_prompts: int = 64          # held-out prompts sampled for the curve
    samples_per_prompt: int = 2      # final metrics: samples per held-out prompt
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes (kept in results.json)

    def __post_init__(self):
        check_config(self)

    def task_kwargs(self) -> dict:
        """The :class:`TaskConfig` keyword arguments (without ``noise`` / ``seed``)."""
        names = ("num_topics", "num_words", "keys_per_topic", "key_density", "min_response_length",
                 "max_response_length", "context_length", "num_train", "num_heldout")
        return {name: getattr(self, name) for name in names}

    @property
    def all_methods(self) -> bool:
        """Whether every method of :data:`METHODS` runs (else the tables cover a subset)."""
        return set(self.methods) == set(METHODS)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seeds"], out["noise_levels"], out["methods"] = list(self.seeds), list(self.noise_levels), \
            list(self.methods)
        return out


def check_config(config: ExperimentConfig) -> None:
    """Raise ``ValueError`` naming the offending field (the CLI maps fields to flags)."""
    if not config.seeds:
        raise ValueError("seeds must not be empty")
    for seed in config.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds must be non-negative ints, got {seed!r}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct, got {list(config.seeds)}")
    if not config.noise_levels:
        raise ValueError("noise_levels must not be empty")
    for noise in config.noise_levels:
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) \
                or not 0.0 <= noise < 0.5:
            raise ValueError(f"noise_levels must be in [0, 0.5), got {noise!r}")
    if len(set(config.noise_levels)) != len(config.noise_levels):
        raise ValueError(f"noise_levels must be distinct, got {list(config.noise_levels)}")
    if not config.methods:
        raise ValueError("methods must not be empty")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown method(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(METHODS)}")
    if len(set(config.methods)) != len(config.methods):
        raise ValueError(f"methods must be distinct, got {list(config.methods)}")
    for name in ("workers", "num_train", "num_heldout", "hidden_size", "num_layers", "num_heads",
                 "intermediate_size", "pretrain_rows", "pretrain_steps", "pretrain_batch", "sft_steps", "steps",
                 "batch_size", "eval_every", "curve_prompts", "samples_per_prompt"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("pretrain_lr", "sft_lr", "lr", "beta"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size ({config.hidden_size}) must be a multiple of num_heads ({config.num_heads})")


#: The presets: field overrides of :class:`ExperimentConfig`.
PRESETS: dict[str, dict] = {
    "smoke": {"seeds": (0,), "noise_levels": (0.0, 0.4), "num_train": 64, "num_heldout": 32,
              "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
              "pretrain_rows": 512, "pretrain_steps": 60, "pretrain_batch": 32, "sft_steps": 10, "steps": 8,
              "batch_size": 8, "eval_every": 4, "curve_prompts": 8, "samples_per_prompt": 1},
    "reduced": {},
    "full": {"seeds": (0, 1, 2, 3, 4), "num_train": 1024, "num_heldout": 256, "hidden_size": 96,
             "num_heads": 4, "intermediate_size": 192, "pretrain_rows": 8192, "pretrain_steps": 1500,
             "sft_steps": 200, "steps": 300, "eval_every": 25, "curve_prompts": 128, "samples_per_prompt": 4},
}


def make_config(preset: str = "reduced", **overrides) -> ExperimentConfig:
    """The preset's :class:`ExperimentConfig` with ``overrides`` (``None`` values are ignored).

    Raises:
        ValueError: an unknown preset, or a value :func:`check_config` rejects (naming the field).
        TypeError: an unknown field.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    for name in ("seeds", "noise_levels", "methods"):
        if name in values:
            values[name] = tuple(values[name])
    return ExperimentConfig(preset=preset, **values)
