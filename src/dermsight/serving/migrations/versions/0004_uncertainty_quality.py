"""Predictions keep whether the ensemble was unsure and the image-quality warnings.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("unsure", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("quality_warnings", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("quality_warnings")
        batch.drop_column("unsure")
