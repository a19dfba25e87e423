"""A process that does the recovery leader's duties (workers/runtime.py) for a given time
as if it held the recovery lease, whoever holds it: two of these at once are two leaders
overlapping, as at a hand-over whose old leader has not yet noticed it lost the lease.
Fault 2 of issue 16 (tests/faults/webhook_scenarios.py) starts them.

    python -m tests.faults.overlapping_leader SECONDS
"""

from __future__ import annotations

import logging
import sys
import time

from core.settings import get_settings
from workers import runtime
from workers.leader import RECOVERY_LEASE, LeaderDuties, LeaderElection
from workers.webhooks import WebhookSender

DONE = "overlapping leader done"


class ActsAsLeader(LeaderElection):
    """An election that never asks the database and always says this process leads."""

    def is_leader(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def main(seconds: float) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    sender = WebhookSender(settings)
    election = ActsAsLeader(settings.database_url, RECOVERY_LEASE, "overlapping", 1.0)
    duties = LeaderDuties(election, runtime.recovery_duty_list(settings, sender))
    duties.start()
    time.sleep(seconds)
    duties.stop()
    sender.close()  # waits for the attempts in flight
    logging.getLogger(__name__).info(DONE)


if __name__ == "__main__":
    main(float(sys.argv[1]))
