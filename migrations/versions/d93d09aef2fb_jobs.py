"""jobs: the job table of app.jobs (images and videos: status, provider operation, result media, errors)

Revision ID: d93d09aef2fb
Revises: 5b8e1d0c7a42
Create Date: 2026-11-30 01:59:55.251737

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "d93d09aef2fb"
down_revision = "5b8e1d0c7a42"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "job",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("phase", sa.String(length=24), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=True),
        sa.Column("user", sa.String(length=100), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("call_id", sa.String(length=32), nullable=False),
        sa.Column("operation_name", sa.String(length=500), nullable=True),
        sa.Column("submitted_at", sa.DateTime(), nullable=True),
        sa.Column("pending_files", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error_kind", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("usage_unit", sa.String(length=16), nullable=True),
        sa.Column("usage_quantity", sa.Numeric(precision=12, scale=3), nullable=True),
        sa.Column("cost", sa.Numeric(precision=14, scale=6), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("queue_job_id", sa.String(length=64), nullable=True),
        sa.Column("next_step_at", sa.DateTime(), nullable=True),
        sa.Column("deadline_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_tenant"), ["tenant"], unique=False)


def downgrade():
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_tenant"))
        batch_op.drop_index(batch_op.f("ix_job_status"))

    op.drop_table("job")
