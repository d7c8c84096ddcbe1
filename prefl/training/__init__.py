"""Lightning plumbing the modules share: the non-finite guard, checked checkpoints, the
warmup-cosine schedule, the KL controller, exact token means under gradient accumulation, metric
logging (:mod:`prefl.training.metrics`), and PPO's rollout, update loop and metrics."""

from prefl.training.schedules import WarmupCosineLR

__all__ = ["WarmupCosineLR"]
