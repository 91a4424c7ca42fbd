"""1,000 tag moves from 50 concurrent clients: the tag ends where the last applied move put it, and its
history holds exactly the acknowledged moves, each one starting where the one before it ended."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

import pytest

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

CLIENTS = 50
MOVES_PER_CLIENT = 20
COMMITS = 4


async def test_concurrent_tag_moves_lose_nothing(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        booted = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"vcpu_count": 1, "mem_size_mib": 128}})
        assert booted.status_code == 201, booted.text
        vm = booted.json()["vm_id"]
        try:
            commits = []
            for version in range(COMMITS):
                await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", f"echo {version} > /root/version"]})
                committed = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": f"v{version}"})
                assert committed.status_code == 201, committed.text
                commits.append(committed.json()["commit_id"])
            assert (await http.post("/api/v1/repositories", json={"name": "contended"})).status_code == 201
            created = await http.post("/api/v1/repositories/contended/tags", json={"tag_name": "latest", "commit_id": commits[0]})
            assert created.status_code == 201, created.text

            async def client(seed: int) -> list[tuple[int, str, str]]:
                """One client's moves, one after another: (status, commit asked for, answer)."""
                choose = random.Random(seed)
                answers = []
                async with platform.client(org) as own:
                    for _ in range(MOVES_PER_CLIENT):
                        target = choose.choice(commits)
                        moved = await own.patch("/api/v1/repositories/contended/tags/latest", json={"commit_id": target})
                        answers.append((moved.status_code, target, moved.json()["commit_id"] if moved.status_code == 200 else moved.text))
                return answers

            answers = [answer for each in await asyncio.gather(*(client(seed) for seed in range(CLIENTS))) for answer in each]
            assert len(answers) == CLIENTS * MOVES_PER_CLIENT
            refused = [(status, text) for status, _, text in answers if status != 200]
            assert not refused, f"{len(refused)} moves refused, the first: {refused[0]}"
            assert all(target == answered for _, target, answered in answers), "an answer names another commit than asked"
            acknowledged = Counter(target for _, target, _ in answers)

            events: list[dict[str, str]] = []  # newest first, page after page
            page: dict[str, str | int] = {"page_size": 1000}
            while True:
                history = await http.get("/api/v1/repositories/contended/tags/latest/history", params=page)
                assert history.status_code == 200, history.text
                events += history.json()["events"]
                if not history.json()["next_page_token"]:
                    break
                page["page_token"] = history.json()["next_page_token"]
            assert [(e["action"], e["new_commit_id"]) for e in events[-1:]] == [("created", commits[0])]
            assert all(e["action"] in ("moved", "updated") for e in events[:-1])
            assert Counter(e["new_commit_id"] for e in events[:-1]) == acknowledged, "history and acknowledged moves differ"
            final = (await http.get("/api/v1/repositories/contended/tags/latest")).json()["commit_id"]
            assert final == events[0]["new_commit_id"], "the tag is not where its last move put it"
            for newer, older in itertools.pairwise(events):
                assert newer["old_commit_id"] == older["new_commit_id"], "a move was lost between two history events"
        finally:
            await http.delete(f"/api/v1/vm/{vm}")
