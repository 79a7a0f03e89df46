"""llm usage: the ledger (llm_usage), its daily rollup, dropped-row reports, and admin API keys

Revision ID: 5b8e1d0c7a42
Revises: 3f7c2a9d41b6
Create Date: 2026-11-30 12:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "5b8e1d0c7a42"
down_revision = "3f7c2a9d41b6"
branch_labels = None
depends_on = None

COST = sa.Numeric(24, 12)
PRICE = sa.Numeric(18, 9)


def upgrade():
    op.create_table(
        "llm_usage",
        sa.Column("call_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("user_name", sa.String(length=200), nullable=True),
        sa.Column("tenant", sa.String(length=200), nullable=True),
        sa.Column("api_key", sa.String(length=100), nullable=True),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=True),
        sa.Column("cached_input_tokens", sa.Integer(), nullable=True),
        sa.Column("cache_write_tokens", sa.Integer(), nullable=True),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("cost", COST, nullable=True),
        sa.Column("input_price", PRICE, nullable=True),
        sa.Column("output_price", PRICE, nullable=True),
        sa.Column("cached_input_price", PRICE, nullable=True),
        sa.Column("cache_write_price", PRICE, nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(length=40), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("call_id"),
    )
    op.create_index("ix_llm_usage_started_at", "llm_usage", ["started_at"])
    op.create_table(
        "llm_usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant", sa.String(length=200), nullable=False),
        sa.Column("user_name", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("cached_calls", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost", COST, nullable=False),
        sa.PrimaryKeyConstraint("day", "tenant", "user_name", "provider", "model"),
    )
    op.create_index("ix_llm_usage_daily_scope", "llm_usage_daily", ["tenant", "user_name", "day"])
    op.create_table(
        "llm_usage_drop",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("dropped_rows", sa.BigInteger(), nullable=False),
        sa.Column("first_dropped_at", sa.DateTime(), nullable=False),
        sa.Column("last_dropped_at", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.String(length=300), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("api_key") as batch:
        batch.add_column(sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade():
    with op.batch_alter_table("api_key") as batch:
        batch.drop_column("admin")
    op.drop_table("llm_usage_drop")
    op.drop_index("ix_llm_usage_daily_scope", table_name="llm_usage_daily")
    op.drop_table("llm_usage_daily")
    op.drop_index("ix_llm_usage_started_at", table_name="llm_usage")
    op.drop_table("llm_usage")
