"""``python -m onpolicy_trainer``: run the trainer service."""

from __future__ import annotations

import sys

from onpolicy.service import service_main
from onpolicy_trainer.app import build
from onpolicy_trainer.settings import TrainerSettings


def main() -> int:
    return service_main(TrainerSettings, build)


if __name__ == "__main__":
    sys.exit(main())
