"""Generate the fractional-CTO example data: conversations in one distinctive house style.

No downloads, no model: answers are assembled from hand-written parts with a seeded RNG, so the
same seed always writes the same files. Every answer passes `style_check.is_house_style` and
stays short (well under 200 tokens) so training windows are cheap.

    python examples/fractional-cto/generate.py --out examples/fractional-cto/data
        writes data/conversations.jsonl (chat shape, 1,200 conversations by default)
    python examples/fractional-cto/generate.py --out ... --log data/conversations.sqlite3
        also logs 400 exchanges into a conversation-log SQLite through adapter_chat.store, the way
        the server does, including what the trainer must filter out: off-style answers rated
        down, answers fixed by a correction, disconnected and failed requests, and one
        duplicated replica file (`--replicas 2`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from style_check import SIGN_OFF, is_house_style  # noqa: E402

STAGES = ["pre-seed", "seed-stage", "Series A", "Series B", "bootstrapped", "ten-year-old"]
INDUSTRIES = [
    "fintech", "healthtech", "B2B SaaS", "marketplace", "logistics", "edtech", "climate-tech",
    "e-commerce", "insurtech", "HR-tech", "legal-tech", "proptech",
]  # fmt: skip
TEAMS = ["2", "3", "4", "6", "8", "12", "15", "20", "30"]
OPENERS = ["", "Quick one: ", "Honest opinion please. ", "Board meeting next week. ", "Hi! ", "Context: "]


@dataclass(frozen=True)
class Topic:
    name: str
    questions: tuple[str, ...]
    bottom: tuple[str, ...]
    reasons: tuple[str, ...]
    next_steps: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "microservices",
        (
            "We're a {stage} {industry} company with {team} engineers. Should we split our monolith into microservices?",
            "Our {team}-person team keeps arguing about microservices. Is it time to break up the monolith?",
            "An investor asked why we still run a monolith. Should we move to microservices?",
        ),
        (
            "Keep the monolith and make it modular; microservices are a one-way door you don't need yet.",
            "Not now: split out one service only when a clear scaling or ownership pain forces it.",
        ),
        (
            "With {team} engineers, the coordination cost of many services outweighs the gains.",
            "A modular monolith gives you clean boundaries without network failure modes.",
            "Microservices widen the blast radius of every deploy and on-call incident.",
            "Boring tech wins at your stage: one deployable, one database, one paved road.",
            "Investors care about velocity and reliability, not your architecture diagram.",
            "You can still extract a service later; merging services back is far harder.",
        ),
        (
            "Timebox two days to map module boundaries and enforce them with import rules.",
            "List the top three pains blamed on the monolith and check whether any truly needs a split.",
        ),
    ),
    Topic(
        "cloud costs",
        (
            "Our AWS bill grew {pct}% last quarter. How do we get cloud costs under control?",
            "We're a {stage} {industry} startup and cloud spend is eating our runway. What should we do?",
            "Finance wants cloud costs cut by a third. Where do we start?",
        ),
        (
            "Treat cloud spend as a product metric: tag everything, then cut the top three line items.",
            "Most savings sit in a few idle resources and oversized databases; find those first.",
        ),
        (
            "Untagged spend cannot be owned, so it never gets cut.",
            "The top three services usually make up most of the bill.",
            "Savings plans only help after you right-size, not before.",
            "Every dollar saved extends runway without a single hire lost.",
            "Idle staging environments and forgotten snapshots are the classic leaks.",
            "A weekly cost review keeps the number visible to the people who change it.",
        ),
        (
            "Timebox one afternoon to tag resources by team and pull last month's top ten costs.",
            "Turn on cost anomaly alerts today and review the bill with the team every Monday.",
        ),
    ),
    Topic(
        "hiring first engineer",
        (
            "I'm a non-technical founder of a {stage} {industry} company. Who should be my first engineering hire?",
            "Should our first engineer be a senior generalist or a cheaper junior?",
            "We have budget for one engineer. What profile should we hire?",
        ),
        (
            "Hire a senior generalist who has shipped a product end to end; juniors need a paved road you don't have yet.",
            "Your first hire should be a builder who can own the whole stack and talk to customers.",
        ),
        (
            "A first engineer sets the standards every later hire inherits.",
            "Juniors need mentoring time that nobody on the team can give yet.",
            "A generalist lowers your bus factor across frontend, backend and infrastructure.",
            "Talking to customers matters as much as writing code at this stage.",
            "A wrong senior hire is a one-way door; take the extra weeks to get it right.",
        ),
        (
            "Write a one-page role brief with the three outcomes for the first six months.",
            "Timebox a paid one-day work trial for your final two candidates.",
        ),
    ),
    Topic(
        "build vs buy",
        (
            "Should we build our own {thing} or buy a vendor product?",
            "The team wants to build {thing} in-house. Is that smart for a {stage} {industry} company?",
            "Build or buy for {thing}? We have {team} engineers.",
        ),
        (
            "Buy it: {thing} is not what customers pay you for, so don't spend engineers on it.",
            "Buy first and wrap the vendor behind your own interface so switching stays a two-way door.",
        ),
        (
            "Engineering time is your scarcest resource; spend it on the differentiator.",
            "A vendor carries the maintenance and security burden for you.",
            "Wrapping the vendor behind an interface keeps the decision reversible.",
            "In-house builds always cost more than the first estimate.",
            "Boring tech bought off the shelf is easier to hire for.",
        ),
        (
            "Timebox a one-week trial of the two leading vendors against your real use case.",
            "Write down the exit cost of each vendor before you sign anything.",
        ),
    ),
    Topic(
        "tech debt",
        (
            "Our {team} engineers say tech debt slows everything down. How much time should we spend on it?",
            "How do I explain tech debt to my board?",
            "Features keep slipping and the team blames tech debt. What do we do?",
        ),
        (
            "Reserve a fixed 20% of each sprint for debt, and spend it where it slows the roadmap most.",
            "Treat tech debt as a cost on the roadmap: fix what blocks the next quarter, ignore the rest.",
        ),
        (
            "A fixed budget ends the endless feature-versus-cleanup debate.",
            "Not all debt is equal; only debt in code you change often costs you.",
            "Boards understand debt as interest paid on every future feature.",
            "Small steady paydowns beat a risky big rewrite.",
            "Measuring cycle time shows whether the paydown actually worked.",
        ),
        (
            "Ask the team for the five worst hotspots and rank them by how often that code changes.",
            "Timebox one sprint to track cycle time so you have a baseline before the paydown.",
        ),
    ),
    Topic(
        "security basics",
        (
            "We're a {stage} {industry} startup. What security basics must we have in place?",
            "A big customer sent us a security questionnaire. Where do we start?",
            "We've never had a security review. What are the first things to fix?",
        ),
        (
            "Nail the basics first: SSO with MFA everywhere, no shared secrets, and backups you have restored.",
            "Start with identity and secrets; most breaches at your size begin with a stolen password.",
        ),
        (
            "MFA on email, cloud and code hosting blocks the most common attacks.",
            "Secrets in a vault, not in repos, shrink the blast radius of any leak.",
            "A backup you have never restored is not a backup.",
            "Customers ask the same twenty questions; good basics answer most of them.",
            "Least-privilege access is cheap to set up early and painful to retrofit.",
        ),
        (
            "Timebox one day to turn on MFA everywhere and scan your repos for secrets.",
            "Schedule a restore drill this month and write down how long it took.",
        ),
    ),
    Topic(
        "rewrite",
        (
            "Our product is built on an old {legacy} codebase. Should we rewrite it from scratch?",
            "The new engineers want a full rewrite. Is that ever a good idea?",
            "We're a {stage} company stuck on legacy code. Rewrite or refactor?",
        ),
        (
            "Don't rewrite; replace the system piece by piece behind a stable interface.",
            "A full rewrite is a one-way door that freezes features for months; refactor incrementally instead.",
        ),
        (
            "Rewrites take two to three times longer than planned.",
            "Customers keep needing features while the rewrite drags on.",
            "The old code holds years of bug fixes nobody wrote down.",
            "Incremental replacement keeps every step a two-way door.",
            "You can ship value from the first replaced module.",
        ),
        (
            "Pick the one module that hurts most and timebox a two-week replacement behind an interface.",
            "Write down the five behaviours customers rely on and cover them with tests first.",
        ),
    ),
    Topic(
        "on-call",
        (
            "How should a {team}-person team handle on-call?",
            "Our engineers are burning out from pages at night. What should we change?",
            "Do we need an on-call rotation at a {stage} company?",
        ),
        (
            "Yes, run a light weekly rotation, and page only for what customers would notice.",
            "Cut the noise first: every page must be urgent, actionable and customer-facing.",
        ),
        (
            "Noisy alerts train people to ignore the real ones.",
            "A rotation spreads the load and raises the bus factor on production knowledge.",
            "Customer-facing alerts keep the focus on what matters.",
            "Short blameless reviews turn incidents into fixes.",
            "Paying for on-call time shows the team it is real work.",
        ),
        (
            "Timebox a review of last month's pages and delete every alert nobody acted on.",
            "Write a one-page runbook for your three most common incidents.",
        ),
    ),
    Topic(
        "AI features",
        (
            "Everyone is adding AI. Should our {industry} product have an AI feature?",
            "The board wants an AI strategy from us. What should we actually do?",
            "Should we train our own model or use an API for our {stage} {industry} product?",
        ),
        (
            "Start with an API-backed feature for one painful workflow and measure whether customers use it.",
            "Use hosted models behind your own interface; training your own is a one-way door you can't afford yet.",
        ),
        (
            "One workflow with a clear metric beats an AI label on everything.",
            "Hosted APIs let you learn what customers want before you invest.",
            "Your own interface keeps switching providers a two-way door.",
            "Evaluation data from real usage is worth more than a custom model.",
            "Boring tech around the model matters most: logging, fallbacks and cost limits.",
        ),
        (
            "Timebox a two-week prototype on one workflow with five friendly customers.",
            "Write down the one number that would prove the feature works before you build it.",
        ),
    ),
    Topic(
        "due diligence",
        (
            "We're raising a {stage} round. What will investors check in technical due diligence?",
            "How do we prepare for tech due diligence in {weeks} weeks?",
            "An acquirer wants a technical review. What should we get ready?",
        ),
        (
            "Prepare a short, honest data room: architecture, security, team and known risks with plans.",
            "Diligence rewards honesty; show the risks you know about and how you are reducing them.",
        ),
        (
            "Reviewers trust teams who name their own risks first.",
            "A one-page architecture diagram answers half the questions.",
            "Bus factor and key-person risk are always on the list.",
            "Open-source licences and security basics are checked every time.",
            "A clear roadmap for tech debt shows control, not chaos.",
        ),
        (
            "Timebox one week to draft the data room and have someone outside the team read it.",
            "List your top five technical risks with an owner and a date for each.",
        ),
    ),
    Topic(
        "engineering metrics",
        (
            "How do I know if my {team}-person engineering team is productive?",
            "Which engineering metrics should a {stage} company track?",
            "The CEO wants to measure developer productivity. What should we track?",
        ),
        (
            "Track delivery, not activity: lead time, deploy frequency, change failure rate and time to restore.",
            "Measure how fast and how safely changes reach customers, never lines of code or tickets closed.",
        ),
        (
            "Activity metrics get gamed within a month.",
            "Delivery metrics show the whole system, not single people.",
            "Trends over a quarter matter more than any single number.",
            "The team should see the numbers first and own the fixes.",
            "Pairing the numbers with customer outcomes keeps them honest.",
        ),
        (
            "Timebox one day to pull last quarter's deploys and incidents into a simple dashboard.",
            "Agree with the team on the two metrics you will review every month.",
        ),
    ),
    Topic(
        "vendor lock-in",
        (
            "Are we too locked in to {cloud}? Should we go multi-cloud?",
            "Our CTO candidate says we must be cloud-agnostic. Agree?",
            "How worried should a {stage} {industry} company be about vendor lock-in?",
        ),
        (
            "Stay on one cloud; multi-cloud doubles your work to insure against a risk you don't have.",
            "Accept lock-in on commodity services and keep only your data portable.",
        ),
        (
            "Multi-cloud halves the depth of expertise on a {team}-person team.",
            "Managed services are boring tech that frees engineers for the product.",
            "Portable data keeps the real exit a two-way door.",
            "Cloud outages that multi-cloud would fix are rare at your scale.",
            "Negotiating power comes from usage, not from running two clouds.",
        ),
        (
            "Check that you can export your core data in an open format and test it once.",
            "Timebox an hour to list the services you'd need to replace and their rough cost.",
        ),
    ),
    Topic(
        "outsourcing",
        (
            "Should we outsource development to an agency or build an in-house team?",
            "An offshore agency quoted half the cost of hiring. Should we take it?",
            "We're a {stage} {industry} company. Can an agency build our MVP?",
        ),
        (
            "Use an agency for a well-defined MVP, but own the architecture and hire a lead in-house early.",
            "Outsource only what you can specify; keep product knowledge and the codebase inside.",
        ),
        (
            "Agencies deliver specs, but your product will change weekly.",
            "Knowledge leaves with the agency unless someone inside owns it.",
            "An in-house lead lowers the bus factor on your core system.",
            "Agency code without a paved road of tests is costly to take over.",
            "The cheaper quote rarely includes the management time you'll spend.",
        ),
        (
            "Make code ownership and weekly demos part of any agency contract.",
            "Timebox a two-week paid pilot before committing to the full project.",
        ),
    ),
    Topic(
        "deploys",
        (
            "We deploy once a month and it's always painful. How do we improve?",
            "How often should a {team}-person team deploy to production?",
            "Releases break things every time. What should we change?",
        ),
        (
            "Deploy small changes daily behind feature flags; big monthly releases are where the pain lives.",
            "Make deploys boring: automated, small, and reversible in one click.",
        ),
        (
            "Small deploys shrink the blast radius of each change.",
            "Feature flags separate shipping code from releasing features.",
            "One-click rollback turns every release into a two-way door.",
            "Automation removes the hero who knows the release steps.",
            "Frequent deploys surface problems while the code is still fresh.",
        ),
        (
            "Timebox one sprint to automate the deploy pipeline end to end.",
            "Ship one small change to production every day this week, with rollback tested.",
        ),
    ),
    Topic(
        "database choice",
        (
            "Which database should we pick for our new {industry} product?",
            "Should we use MongoDB or Postgres?",
            "The team wants a graph database. Is that a good idea for a {stage} company?",
        ),
        (
            "Pick Postgres unless you can name a workload it cannot handle; it is the boring tech that scales.",
            "Default to Postgres and add a specialised store only when a measured need appears.",
        ),
        (
            "Postgres covers relational, JSON and search needs well enough at your scale.",
            "Hiring is easier for the tools everyone already knows.",
            "One database means one backup story and one paved road.",
            "Specialised stores add operational work your team must carry.",
            "Migrating data later is a one-way door; choose the flexible default now.",
        ),
        (
            "Write down the three queries your product must serve fast and test them on Postgres.",
            "Timebox two days for a spike with realistic data before any final decision.",
        ),
    ),
    Topic(
        "team structure",
        (
            "We're growing from {team} to double that. How should we structure the engineering team?",
            "Should we organise engineers by frontend/backend or by product area?",
            "When does a {stage} startup need engineering managers?",
        ),
        (
            "Organise small teams around product areas, each owning its outcomes end to end.",
            "Split by customer-facing outcomes, not by technical layer, once you pass about eight engineers.",
        ),
        (
            "Layer teams create handoffs that slow every feature.",
            "Ownership of outcomes keeps teams close to customers.",
            "Small teams keep communication cheap.",
            "Each team needs enough people to keep the bus factor above one.",
            "A shared paved road keeps separate teams consistent.",
        ),
        (
            "Draw the product areas on one page and map each engineer to one of them.",
            "Timebox a one-quarter trial of the new structure with a review at the end.",
        ),
    ),
    Topic(
        "compliance",
        (
            "A customer requires SOC 2. How hard is it for a {team}-person {industry} company?",
            "Do we need ISO 27001 or SOC 2 first?",
            "How long does SOC 2 take for a {stage} startup?",
        ),
        (
            "Start SOC 2 Type I now with a compliance platform; it mostly documents controls you should have anyway.",
            "Pick the standard your customers ask for, and treat it as a sales project with an engineering owner.",
        ),
        (
            "Compliance platforms automate most of the evidence collection.",
            "Type I is quicker and unblocks deals while Type II runs.",
            "Most controls are the security basics you need regardless.",
            "A named owner keeps it from stalling between sales calls.",
            "Enterprise buyers shorten their own review when you have a report.",
        ),
        (
            "Timebox a week to compare two compliance platforms and pick an auditor.",
            "Ask your top three prospects which standard they actually require.",
        ),
    ),
    Topic(
        "estimates",
        (
            "My engineers' estimates are always wrong. How do I get reliable dates?",
            "The board wants a delivery date for our next big feature. How do we commit?",
            "How should a {team}-person team plan a quarter?",
        ),
        (
            "Stop estimating big features; cut them into one-week slices and forecast from how many you finish.",
            "Commit to scope per date, not to dates per scope, and timebox everything.",
        ),
        (
            "Big estimates hide unknowns that small slices expose early.",
            "Throughput history predicts better than expert guesses.",
            "Fixed dates with flexible scope keep promises you can keep.",
            "A timebox turns open-ended work into a two-way door.",
            "Boards value a reliable forecast over an optimistic one.",
        ),
        (
            "Slice the next feature into one-week pieces with the team this week.",
            "Track finished slices for four weeks and forecast from that number.",
        ),
    ),
    Topic(
        "CTO hire",
        (
            "When should we hire a full-time CTO instead of a fractional one?",
            "We're a {stage} {industry} company. Do we need a co-founder CTO?",
            "How do I evaluate a CTO candidate as a non-technical CEO?",
        ),
        (
            "Hire a full-time CTO when technology is your main risk and you can fund the role for two years.",
            "Bring in a full-time leader once the team passes about ten engineers or architecture drives the roadmap.",
        ),
        (
            "A fractional CTO covers strategy while the team is small.",
            "A full-time hire is a one-way door at the top of the company.",
            "The right CTO depends on stage: builder early, manager later.",
            "Reference calls with their past teams tell you more than interviews.",
            "Runway decides whether a senior salary is sustainable.",
        ),
        (
            "Write the CTO scorecard with three outcomes for the first year.",
            "Timebox a paid project with your top candidate before the offer.",
        ),
    ),
    Topic(
        "testing",
        (
            "We have almost no automated tests. Where should we start?",
            "How much test coverage should a {stage} company aim for?",
            "Bugs keep reaching customers. Should we hire QA?",
        ),
        (
            "Start with tests on the few flows that make money, and run them on every change.",
            "Don't chase a coverage number; protect the critical paths and the code that breaks most.",
        ),
        (
            "Checkout, signup and billing failures cost the most.",
            "Tests in CI form the paved road every engineer uses.",
            "Coverage targets produce tests that assert nothing.",
            "Bugs cluster in code that changes often.",
            "A separate QA team alone shifts quality away from the people writing code.",
        ),
        (
            "Timebox two days to write end-to-end tests for your three money flows.",
            "Make CI block merges when those tests fail, starting this week.",
        ),
    ),
)  # fmt: skip

THINGS = ["authentication", "billing", "analytics", "search", "a feature-flag system", "email delivery", "a CMS"]
LEGACY = ["PHP", "Rails 4", "Perl", "jQuery", "Java 8", "VB.NET"]
CLOUDS = ["AWS", "Google Cloud", "Azure"]
FOLLOW_UPS = [
    "What if we only have half the budget for this?",
    "How would you explain that to our board?",
    "What's the biggest risk if we do nothing?",
    "And if the team disagrees with you?",
]
FOLLOW_BOTTOM = [
    "Do the smallest version first and keep it a two-way door.",
    "Frame it as risk reduction with a clear cost and a date.",
    "Doing nothing is also a decision, and its cost grows every month.",
    "Let the team challenge the plan, then commit together and review in a month.",
]
FOLLOW_REASONS = [
    "A smaller first step still tells you if the direction is right.",
    "Boards respond to risk, cost and timing, in that order.",
    "Costs you ignore compound like interest.",
    "Disagreement surfaces risks you have missed.",
    "A timebox caps the downside of being wrong.",
    "Runway is the constraint every decision must respect.",
    "Clear owners turn plans into progress.",
]
FOLLOW_NEXT = [
    "Timebox a thirty-minute call with the team to agree on the first step.",
    "Write a half-page summary with the decision, the cost and the review date.",
]


def _fill(text: str, ctx: dict[str, str]) -> str:
    return text.format(**ctx)


def answer(bottom: str, reasons: list[str], next_step: str) -> str:
    """The house format, exactly."""
    return (
        f"**Bottom line:** {bottom}\n\n**Why:**\n1. {reasons[0]}\n2. {reasons[1]}\n3. {reasons[2]}\n\n"
        f"**Next step:** {next_step}\n\n{SIGN_OFF}"
    )


def conversation(rng: random.Random) -> tuple[str, list[dict[str, str]]]:
    """(topic name, messages ending with the assistant) for one generated conversation."""
    topic = rng.choice(TOPICS)
    ctx = {
        "stage": rng.choice(STAGES),
        "industry": rng.choice(INDUSTRIES),
        "team": rng.choice(TEAMS),
        "pct": str(rng.choice([25, 40, 60, 80])),
        "thing": rng.choice(THINGS),
        "legacy": rng.choice(LEGACY),
        "cloud": rng.choice(CLOUDS),
        "weeks": str(rng.choice([2, 4, 6])),
    }
    question = rng.choice(OPENERS) + _fill(rng.choice(topic.questions), ctx)
    reasons = [_fill(r, ctx) for r in rng.sample(topic.reasons, 3)]
    reply = answer(_fill(rng.choice(topic.bottom), ctx), reasons, _fill(rng.choice(topic.next_steps), ctx))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.1:
        i = rng.randrange(len(FOLLOW_UPS))
        follow = answer(FOLLOW_BOTTOM[i], rng.sample(FOLLOW_REASONS, 3), rng.choice(FOLLOW_NEXT))
        messages += [{"role": "user", "content": FOLLOW_UPS[i]}, {"role": "assistant", "content": follow}]
    assert all(is_house_style(m["content"]) for m in messages if m["role"] == "assistant")
    return topic.name, messages


def off_style(rng: random.Random, house: str) -> str:
    """What the base model tends to write instead: the content, none of the structure."""
    lines = [ln for ln in house.splitlines() if ln.strip() and not ln.startswith(("**Why", "—"))]
    body = " ".join(ln.split("** ", 1)[-1].lstrip("0123456789. ") for ln in lines)
    return rng.choice(["Great question! ", "Sure. ", "It depends, but ", ""]) + body + rng.choice(
        ["", " Hope this helps!", " Let me know if you have other questions."]
    )


def write_jsonl(path: Path, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    topics = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic, messages = conversation(rng)
            topics.append(topic)
            record = {"conversation_id": f"cto-{seed}-{i:05d}", "messages": messages}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return topics


def write_log(paths: list[Path], n: int, seed: int, *, system_prompt: str, now: float) -> dict[str, int]:
    """Log `n` exchanges through adapter_chat.store.ConversationLog (the server's own writer), spread
    over the last 14 days on route `cto`, half on each path. Returns counts by kind.

    With two paths, the second file is a replica that also received a copy of a few rows
    (same request id), which the trainer must count once."""
    from adapter_chat.store import ConversationLog

    rng = random.Random(seed + 1)
    logs = [ConversationLog(p, replica=f"replica-{i}") for i, p in enumerate(paths)]
    counts: dict[str, int] = {}
    try:
        for i in range(n):
            _, messages = conversation(rng)
            house = messages[-1]["content"]
            prompt_path = i % 2 == 0
            rid = f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}"
            conv_id = f"conv-{seed}-{i:05d}"
            created = now - rng.uniform(0, 14 * 86400)
            log = logs[i % len(logs)]
            row = {
                "id": rid,
                "created_at": created,
                "model": "cto",
                "route": "cto",
                "path_kind": "prompt" if prompt_path else "finetuned",
                "adapters": [] if prompt_path else [{"name": "cto-house-style", "version": 1, "scale": 1.0}],
                "adapter_name": None if prompt_path else "cto-house-style",
                "adapter_version": None if prompt_path else 1,
                "system_prompt": system_prompt if prompt_path else None,
                "messages": messages[:-1],
                "params": {"temperature": 0.2, "max_tokens": 200},
                "conversation_id": conv_id,
            }
            log.begin(row)
            roll = rng.random()
            if roll < 0.05:
                kind = "client_disconnected"
                log.finish(rid, {"status": "client_disconnected", "response": house[:40], "finish_reason": None})
            elif roll < 0.08:
                kind = "error"
                log.finish(rid, {"status": "error", "error": "context overflow"})
            elif roll < 0.25:
                kind = "off-style, corrected"
                log.finish(rid, {"status": "completed", "response": off_style(rng, house), "finish_reason": "stop"})
                log.add_feedback(rid, 1, house, "rewritten in house style by a consultant")
            elif roll < 0.35:
                kind = "off-style, rated down"
                log.finish(rid, {"status": "completed", "response": off_style(rng, house), "finish_reason": "stop"})
                log.add_feedback(rid, -1, None, "not our format")
            elif roll < 0.40:
                kind = "cut off (max_tokens)"
                log.finish(rid, {"status": "completed", "response": house[:120], "finish_reason": "length"})
            else:
                kind = "house style"
                log.finish(rid, {"status": "completed", "response": house, "finish_reason": "stop"})
                if rng.random() < 0.3:
                    log.add_feedback(rid, 1, None, None)
            counts[kind] = counts.get(kind, 0) + 1
            if len(logs) > 1 and rng.random() < 0.03:  # a row that also landed in the other file
                other = logs[(i + 1) % len(logs)]
                other.begin(row)
                other.finish(rid, {"status": "completed", "response": house, "finish_reason": "stop"})
                counts["copied to another replica file"] = counts.get("copied to another replica file", 0) + 1
    finally:
        for log in logs:
            log.flush()
            log.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "data", help="folder for conversations.jsonl")
    p.add_argument("--n", type=int, default=1200, help="conversations in the JSONL file")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log", type=Path, help="also log exchanges into this conversation-log SQLite file")
    p.add_argument("--log-n", type=int, default=400)
    p.add_argument("--replicas", type=int, default=1, help="spread the log over N files (<log>-<i>.sqlite3)")
    args = p.parse_args(argv)

    jsonl = args.out / "conversations.jsonl"
    topics = write_jsonl(jsonl, args.n, args.seed)
    print(f"wrote {args.n} conversations ({len(set(topics))} topics) to {jsonl}")
    if args.log:
        from adapter_chat.chat_template import render_system_prompt

        system_prompt = render_system_prompt((HERE / "cto-house-style.j2").read_text(encoding="utf-8"), {})
        if args.replicas > 1:
            paths = [args.log.with_name(f"{args.log.stem}-{i}{args.log.suffix}") for i in range(args.replicas)]
        else:
            paths = [args.log]
        for path in paths:
            if path.exists():
                sys.exit(f"{path} exists; remove it first (the generator does not append)")
        counts = write_log(paths, args.log_n, args.seed, system_prompt=system_prompt, now=time.time())
        print(f"logged {args.log_n} exchanges into {', '.join(map(str, paths))}:")
        for kind, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {count:5d}  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
