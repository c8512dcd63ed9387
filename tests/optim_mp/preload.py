"""Imported once by the harness's forkserver, so that every worker process it forks
starts with torch, torch._dynamo, the project and the training corpus loaded
(about 4 s of CPU per worker otherwise, on two shared cores)."""

from tests.optim_mp.worker import warm

warm()
