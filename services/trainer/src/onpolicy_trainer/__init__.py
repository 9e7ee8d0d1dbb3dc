"""onpolicy trainer service: DPO rounds with TRL on streamed preference pairs."""

from onpolicy_trainer.dpo import RoundResult, train_round
from onpolicy_trainer.settings import TrainerSettings

__all__ = ["RoundResult", "TrainerSettings", "train_round"]
