"""Lightning plumbing the modules share: the non-finite guard, checked checkpoints, the
warmup-cosine
schedule, the KL controller, exact token means under gradient accumulation, and PPO's rollout and
update loops."""

from prefl.training.schedules import WarmupCosineLR

__all__ = ["WarmupCosineLR"]
