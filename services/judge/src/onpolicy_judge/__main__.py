"""``python -m onpolicy_judge [--config FILE]``: run the judge service."""

from __future__ import annotations

import sys

from onpolicy.service import service_main
from onpolicy_judge.service import build
from onpolicy_judge.settings import JudgeSettings


def main() -> int:
    return service_main(JudgeSettings, build)


if __name__ == "__main__":
    sys.exit(main())
