"""Write examples/runs.jsonl: 24 agent runs of an airline support agent, made up by this project
(no third-party data), for the README's quick start. Deterministic: running it again writes the
same file.

    python scripts/make_example_runs.py

Each run has the agent's transcript (system prompt, the customer, tool calls and their results,
the answer) and, for some, the simulated customer's own transcript; scores `reward` (the task
solved) and `turns`; metadata naming the model and the task.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

from agentrun import AgentRun, BaseAgentRunMetadata, Transcript
from agentrun.chat import (
    AssistantMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)

OUT = Path(__file__).resolve().parent.parent / "examples" / "runs.jsonl"
NAMESPACE = uuid.UUID("5b0f3c64-3a59-4b4f-9b8a-0c7f1c4e2d10")
SYSTEM = (
    "You are the support agent of Skyward Air. Use the tools to look up and change bookings. "
    "Confirm every change with the customer before making it. Never refund a basic-economy "
    "fare; offer a travel credit instead."
)
CUSTOMERS = ["Ana Ruiz", "Bo Chen", "Carla Moreau", "Dmitri Ivanov", "Esi Mensah", "Farah Khan"]
CITIES = [("SFO", "JFK"), ("LHR", "CDG"), ("ORD", "DEN"), ("SEA", "BOS"), ("MIA", "ATL")]
MODELS = ["gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022"]


def reservation(rng: random.Random, name: str) -> dict[str, object]:
    origin, destination = rng.choice(CITIES)
    return {
        "reservation_id": f"R{rng.randrange(10000, 99999)}",
        "passenger": name,
        "flight": f"SW{rng.randrange(100, 999)}",
        "origin": origin,
        "destination": destination,
        "date": f"2026-12-{rng.randrange(1, 28):02d}",
        "cabin": rng.choice(["basic_economy", "economy", "business"]),
    }


def change_flight(rng: random.Random, name: str, solved: bool) -> tuple[list[object], str]:
    booking = reservation(rng, name)
    new_date = f"2026-12-{rng.randrange(1, 28):02d}"
    messages: list[object] = [
        SystemMessage(content=SYSTEM),
        UserMessage(
            content=f"Hi, I'm {name}. Can I move my flight {booking['reservation_id']} "
            f"to {new_date}?"
        ),
        AssistantMessage(
            content="Let me look up your reservation.",
            tool_calls=[
                ToolCall(
                    id="c1",
                    function="get_reservation",
                    arguments={"reservation_id": booking["reservation_id"]},
                )
            ],
        ),
        ToolMessage(content=json.dumps(booking), tool_call_id="c1", function="get_reservation"),
        AssistantMessage(
            content=f"Checking flights from {booking['origin']} to {booking['destination']} on "
            f"{new_date}.",
            tool_calls=[
                ToolCall(
                    id="c2",
                    function="search_flights",
                    arguments={
                        "origin": booking["origin"],
                        "destination": booking["destination"],
                        "date": new_date,
                    },
                )
            ],
        ),
        ToolMessage(
            content=json.dumps(
                [
                    {
                        "flight": f"SW{rng.randrange(100, 999)}",
                        "seats": rng.randrange(1, 9),
                        "fare_difference": rng.choice([0, 45, 120]),
                    }
                ]
            ),
            tool_call_id="c2",
            function="search_flights",
        ),
    ]
    if solved:
        messages += [
            AssistantMessage(content="There is a seat on that day. Shall I move your booking?"),
            UserMessage(content="Yes please."),
            AssistantMessage(
                content="Moving it now.",
                tool_calls=[
                    ToolCall(
                        id="c3",
                        function="update_reservation",
                        arguments={"reservation_id": booking["reservation_id"], "date": new_date},
                    )
                ],
            ),
            ToolMessage(
                content='{"status": "updated"}', tool_call_id="c3", function="update_reservation"
            ),
            AssistantMessage(content=f"Done: you now fly on {new_date}. Anything else?"),
        ]
        outcome = "moved"
    else:
        messages += [
            AssistantMessage(
                content="I moved your flight.",
                tool_calls=[
                    ToolCall(
                        id="c3",
                        function="update_reservation",
                        arguments={"reservation_id": booking["reservation_id"], "date": new_date},
                    )
                ],
            ),
            ToolMessage(
                content='{"status": "updated"}', tool_call_id="c3", function="update_reservation"
            ),
            UserMessage(content="Wait, I had not agreed to the fare difference yet!"),
            AssistantMessage(content="I'm sorry, the change is already made."),
        ]
        outcome = "changed without consent"
    return messages, outcome


def cancel(rng: random.Random, name: str, solved: bool) -> tuple[list[object], str]:
    booking = reservation(rng, name)
    basic = booking["cabin"] == "basic_economy"
    messages: list[object] = [
        SystemMessage(content=SYSTEM),
        UserMessage(
            content=f"Please cancel reservation {booking['reservation_id']} and refund me."
        ),
        AssistantMessage(
            content="One moment while I find it.",
            tool_calls=[
                ToolCall(
                    id="c1",
                    function="get_reservation",
                    arguments={"reservation_id": booking["reservation_id"]},
                )
            ],
        ),
        ToolMessage(content=json.dumps(booking), tool_call_id="c1", function="get_reservation"),
    ]
    refund = not basic or not solved
    messages.append(
        AssistantMessage(
            content=(
                "Your fare is refundable; cancelling with a refund."
                if refund
                else "Basic-economy fares are not refundable; I can offer a travel credit instead."
            ),
            tool_calls=[
                ToolCall(
                    id="c2",
                    function="cancel_reservation",
                    arguments={"reservation_id": booking["reservation_id"], "refund": refund},
                )
            ],
        )
    )
    messages.append(
        ToolMessage(
            content='{"status": "cancelled"}', tool_call_id="c2", function="cancel_reservation"
        )
    )
    messages.append(AssistantMessage(content="Your reservation is cancelled."))
    return messages, "refunded a basic fare" if basic and refund else "cancelled"


def simulated_customer(name: str, task: str) -> list[object]:
    return [
        SystemMessage(
            content=f"You are {name}, a Skyward Air customer. Your goal: {task}. Do "
            "not accept changes you did not agree to."
        ),
        UserMessage(content="The agent greets you."),
        AssistantMessage(content=f"Hi, I'm {name}. I need help: {task}."),
    ]


def make_run(i: int, rng: random.Random) -> AgentRun:
    name = CUSTOMERS[i % len(CUSTOMERS)]
    solved = rng.random() < 0.6
    kind = "change_flight" if i % 2 == 0 else "cancel"
    maker = change_flight if kind == "change_flight" else cancel
    messages, outcome = maker(rng, name, solved)
    reward = 1.0 if solved and outcome in ("moved", "cancelled") else 0.0
    transcripts = {"agent": Transcript(name="agent", messages=messages)}
    if i % 3 == 0:
        task = "move a flight" if kind == "change_flight" else "cancel a booking"
        transcripts["customer"] = Transcript(
            name="simulated customer", messages=simulated_customer(name, task)
        )
    run_id = str(uuid.uuid5(NAMESPACE, f"example-{i}"))
    return AgentRun(
        id=run_id,
        name=f"{kind} #{i}",
        description=f"Skyward Air support: {kind.replace('_', ' ')} for {name} ({outcome})",
        transcripts={
            key: Transcript(
                id=str(uuid.uuid5(NAMESPACE, f"{run_id}/{key}")), name=t.name, messages=t.messages
            )
            for key, t in transcripts.items()
        },
        metadata=BaseAgentRunMetadata(
            scores={"reward": reward, "turns": len(messages)},
            model=MODELS[i % len(MODELS)],
            task=kind,
            outcome=outcome,
        ),
    )


def main() -> None:
    rng = random.Random(20261130)
    runs = [make_run(i, rng) for i in range(24)]
    with OUT.open("w") as out:
        for run in runs:
            data = run.model_dump(mode="json")
            data.pop("text", None)  # derived: the reader renders it again
            out.write(json.dumps(data, sort_keys=True) + "\n")
    print(f"wrote {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
