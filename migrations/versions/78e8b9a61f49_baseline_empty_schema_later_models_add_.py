"""baseline: empty schema; later models add their own revisions

Revision ID: 78e8b9a61f49
Revises:
Create Date: 2026-11-21 23:34:15.417620

"""

# revision identifiers, used by Alembic.
revision = "78e8b9a61f49"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
