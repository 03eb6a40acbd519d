"""The gateway inside the one-process platform (``ragplane up``): mounted at
``/gateway``, on embedded defaults — the no-model ``local-extractive`` provider behind
the ``support-quality`` alias — reached with a tenant's virtual key."""

from __future__ import annotations

from pathlib import Path

import openai
import psycopg

from ragplane.control.apikeys import create_api_key
from ragplane.data.db import Database
from ragplane.platform import create_app
from tests.conftest import PgCluster, make_settings, running

PROMPT = """Answer from the sources below and cite them as [n].

Sources:
[1] Refunds for EU customers
Customers in the EU may return any order within 14 days for a full refund.
Refunds are paid to the original payment method.

[2] Shipping
Orders ship within two business days.

Question: How many days do EU customers have to return an order?"""


async def test_the_embedded_default_answers_with_citations(
    clean_db: PgCluster, tmp_path: Path
) -> None:
    async with Database(clean_db.owner, max_size=1) as owner, owner.control() as session:
        _, key = await create_api_key(session, "tnt_alpha", scopes=("gateway",))
    app = create_app(make_settings(clean_db, tmp_path))
    async with running(app) as http:
        client = openai.AsyncOpenAI(
            base_url="http://ragplane.test/gateway/v1",
            api_key=key,
            http_client=http,
            max_retries=0,
        )
        models = [m.id async for m in client.models.list()]
        completion = await client.chat.completions.create(
            model="support-quality", messages=[{"role": "user", "content": PROMPT}]
        )
        await app.state.platform.gateway.ledger.stop()
    assert models == ["rewrite", "support-quality"]
    answer = completion.choices[0].message.content
    assert answer is not None
    assert "within 14 days for a full refund. [1]" in answer
    assert "[2]" not in answer
    with psycopg.connect(clean_db.superuser_url) as conn:
        rows = conn.execute(
            "SELECT tenant_id, alias, provider, cost_usd FROM llm_ledger"
        ).fetchall()
    assert [(t, a, p, float(c)) for t, a, p, c in rows] == [
        ("tnt_alpha", "support-quality", "local", 0.0)
    ]
