"""Predictions keep the melanoma activation map their heat map is drawn from: the heat map
is made on its first request (a scoring no longer renders one that nobody looks at), so
`heatmap_path` stays NULL until then.

Revision ID: 0007_melanoma_cam
Revises: 0006_refused_no_risk
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_melanoma_cam"
down_revision: str | None = "0006_refused_no_risk"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("melanoma_cam", sa.JSON(), nullable=True))


def downgrade() -> None:
    # The old schema draws every accepted image's heat map at scoring time: rows whose map
    # was never requested have none, and lose their activation map here.
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("melanoma_cam")
