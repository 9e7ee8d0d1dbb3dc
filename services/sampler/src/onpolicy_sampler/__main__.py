"""``python -m onpolicy_sampler``: run the sampler until SIGTERM/Ctrl-C."""

import sys

from onpolicy.service import service_main
from onpolicy_sampler.app import build
from onpolicy_sampler.settings import SamplerSettings


def main() -> int:
    return service_main(SamplerSettings, build)


if __name__ == "__main__":
    sys.exit(main())
