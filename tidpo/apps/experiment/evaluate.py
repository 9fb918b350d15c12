"""Metrics of a trained policy on the held-out half of the synthetic task.

- **held-out accuracy** (``heldout_accuracy``): share of held-out pairs (true labels) whose implicit reward
  ``r(x, y) = Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)`` (summed over the response tokens, EOS
  included) is larger for the chosen than for the rejected response; ``heldout_margin`` is the mean of
  ``r(x, y_w) − r(x, y_l)`` (unscaled by β). The SFT row uses the pretrained base as its reference.
- **sampled reward** (``reward``): mean hidden reward (``task.rewards_of_ids``) of responses sampled from
  the policy on the held-out prompts (temperature 1, no top-k / top-p, at most ``max_response_length + 1``
  tokens, scored up to and including the first EOS); ``samples_per_prompt`` seeded samples per prompt, the
  same seed for every method (common random numbers).
- **KL** (``kl``): Monte-Carlo estimate of KL(π‖π_ref) on those samples: the mean over samples of
  ``Σ_t log π(y_t) − log π_ref(y_t)`` over the sampled tokens (EOS included).
- ``response_length`` (mean sampled words before EOS) and ``eos_rate`` (share of samples that ended with
  EOS): sanity checks of the samples.
- **TI-DPO weight AUC**: ROC-AUC of :func:`tidpo.weights.attribution.ti_dpo_token_weights` (the run's λ, σ,
  scope and importance: the uniform / random ablations are scored on the weights they train with) on the
  held-out pairs, computed with a given policy, against ``task.key_labels`` (``decisive``: the
  words that support the preference, +1 words in the chosen and −1 words in the rejected response; ``key``:
  every ±1 word).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tidpo._model_state import eval_mode
from tidpo.apps.experiment.metrics import weight_auc
from tidpo.apps.experiment.models import IGNORE_INDEX
from tidpo.apps.experiment.training import tokenize_rows
from tidpo.data import PreferenceCollator
from tidpo.ops import token_logps
from tidpo.trainer.anchors import through_first_eos
from tidpo.weights.attribution import model_reference, ti_dpo_token_weights

__all__ = ["LABEL_MODES", "Evaluator"]

LABEL_MODES = ("decisive", "key")
_EVAL_BATCH = 64


class Evaluator:
    """Held-out metrics of a policy for one cell (task, seed); see the module docstring.

    Args:
        task: the :class:`~tidpo.apps.experiment.task.SyntheticTask`.
        config: the :class:`~tidpo.apps.experiment.presets.ExperimentConfig`.
        seed: seeds the sampling (final metrics: ``seed``; curve: ``seed + 1``).
    """

    def __init__(self, task, config, *, seed: int):
        self.task, self.config, self.seed = task, config, seed
        tokenizer = task.tokenizer
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in task.heldout_rows]
        self.heldout = tokenize_rows(rows, tokenizer)
        self.collator = PreferenceCollator(self.pad_id, ignore_index=IGNORE_INDEX)
        self.key_labels = {mode: task.key_labels(task.heldout_rows, mode=mode) for mode in LABEL_MODES}
        # The held-out prompts, LEFT-padded for generation: the collator's prompt_input_ids of every pair.
        prompts = self.collator([self.heldout[i] for i in range(len(self.heldout))])
        self.prompt_ids, self.prompt_mask = prompts["prompt_input_ids"], prompts["prompt_attention_mask"]
        self.topics = task.topic_ids(self.prompt_ids)

    # -- sampling --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, *, num_prompts: int | None = None, repeats: int = 1, seed: int) -> dict:
        """Seeded samples on the first ``num_prompts`` held-out prompts (``repeats`` each), global RNG untouched.

        Returns ``{"prompt_ids", "prompt_mask", "response_ids", "response_mask", "reward"}`` (the mask
        covers the response up to and including its first EOS; ``reward`` is ``[N]`` float32).
        """
        count = len(self.topics) if num_prompts is None else min(num_prompts, len(self.topics))
        prompt_ids = self.prompt_ids[:count].repeat_interleave(repeats, 0)
        prompt_mask = self.prompt_mask[:count].repeat_interleave(repeats, 0)
        topics = self.topics[:count].repeat_interleave(repeats, 0)
        with eval_mode(model), torch.random.fork_rng():
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=self.config.max_response_length + 1,
                                 pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        response = out[:, prompt_ids.shape[1]:]
        mask = through_first_eos(response, self.eos_id)
        reward = self.task.rewards_of_ids(topics, response, mask)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response,
                "response_mask": mask, "reward": reward}

    def curve_reward(self, model) -> float:
        """Mean hidden reward on the curve's fixed prompt subset (one sample each, seed ``seed + 1``)."""
        return float(self.sample(model, num_prompts=self.config.curve_prompts, seed=self.seed + 1)["reward"].mean())

    @torch.no_grad()
    def _response_logps(self, model, samples: dict) -> torch.Tensor:
        """``[N]``: Σ_t log π(y_t | x, y_<t) over each sample's response tokens (tidpo.token_logps)."""
        ids = torch.cat([samples["prompt_ids"], samples["response_ids"]], dim=1)
        mask = torch.cat([samples["prompt_mask"], samples["response_mask"].long()], dim=1)
        labels = torch.cat([torch.full_like(samples["prompt_ids"], IGNORE_INDEX),
                            samples["response_ids"].masked_fill(~samples["response_mask"], IGNORE_INDEX)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = []
        for start in range(0, ids.shape[0], _EVAL_BATCH):
            part = slice(start, start + _EVAL_BATCH)
            logits = model(input_ids=ids[part], attention_mask=mask[part], position_ids=positions[part],
                           use_cache=False).logits[:, :-1]
            out.append(token_logps(logits, labels[part, 1:], IGNORE_INDEX).sum(-1))
        return torch.cat(out)

    # -- pairs -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _pair_logps(self, model) -> torch.Tensor:
        """``[N, 2]``: summed response log-probs (chosen, rejected) of every held-out pair."""
        model.eval()
        out = []
        for batch in DataLoader(self.heldout, batch_size=_EVAL_BATCH, shuffle=False, collate_fn=self.collator):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits[:, :-1]
            logps = token_logps(logits, batch["labels"][:, 1:], IGNORE_INDEX).sum(-1)
            half = logps.shape[0] // 2
            out.append(torch.stack([logps[:half], logps[half:]], dim=1))
        return torch.cat(out)

    def metrics(self, policy, reference) -> dict:
        """Held-out accuracy / margin, sampled reward, KL(π‖π_ref) and sample statistics (module docstring)."""
        rewards = self._pair_logps(policy) - self._pair_logps(reference)
        margin = rewards[:, 0] - rewards[:, 1]
        samples = self.sample(policy, repeats=self.config.samples_per_prompt, seed=self.seed)
        policy.eval()
        kl = self._response_logps(policy, samples) - self._response_logps(reference, samples)
        ended = (samples["response_ids"] == self.eos_id).any(-1)
        words = samples["response_mask"].sum(-1) - ended.long()
        return {"heldout_accuracy": float((margin > 0).float().mean()), "heldout_margin": float(margin.mean()),
                "reward": float(samples["reward"].mean()), "kl": float(kl.mean()),
                "response_length": float(words.float().mean()), "eos_rate": float(ended.float().mean())}

    def ti_weight_auc(self, policy, *, lam: float, sigma_div: float, scope: str, importance: str = "gradient",
                      target: str = "top_logit", reference=None) -> dict:
        """``{"decisive": AUC, "key": AUC}`` of the TI-DPO weights of ``policy`` on the held-out pairs.

        ``importance`` is the run's ``ti_importance``: the uniform / random ablations are scored on the weights
        they train with (random ones drawn from a generator seeded with the cell's seed). ``target`` is the run's
        ``ti_attribution_target``; ``reference`` the run's reference model (read by ``log_ratio``).
        """
        model_ref = None if reference is None or target != "log_ratio" else model_reference(reference)
        rows = []
        generator = torch.Generator().manual_seed(self.seed)
        for batch in DataLoader(self.heldout, batch_size=_EVAL_BATCH, shuffle=False, collate_fn=self.collator):
            weights = ti_dpo_token_weights(policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                           lam=lam, sigma_div=sigma_div, scope=scope, ignore_index=IGNORE_INDEX,
                                           importance=importance, generator=generator, target=target,
                                           reference=model_ref)
            response = batch["labels"] != IGNORE_INDEX
            half = weights.shape[0] // 2
            for i in range(half):
                rows.append({"chosen_weights": weights[i][response[i]].tolist(),
                             "rejected_weights": weights[half + i][response[half + i]].tolist()})
        return {mode: weight_auc(rows, self.key_labels[mode]) for mode in LABEL_MODES}
