"""A refused image (not dermoscopic) carries no risk: the model-output columns may be NULL,
`refusal` holds the reason code, and rows stored before are cleared of their risk.

Revision ID: 0006_refused_no_risk
Revises: 0005_key_roles_audit
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_refused_no_risk"
down_revision: str | None = "0005_key_roles_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WITHHELD = (
    ("probabilities", sa.JSON()), ("predicted_class", sa.String(10)), ("melanoma_risk", sa.Float()),
    ("above_threshold", sa.Boolean()), ("heatmap_path", sa.String(200)),
)


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("refusal", sa.String(40), nullable=True))
        for name, kind in WITHHELD:
            batch.alter_column(name, existing_type=kind, nullable=True)
    # Rows refused before this revision still held a risk: clear it (their heat map files are
    # then unreferenced, and `dermsight serve`'s file check removes them).
    predictions = sa.table(
        "predictions", sa.column("looks_dermoscopic", sa.Boolean()), sa.column("refusal", sa.String(40)),
        sa.column("risk_spread", sa.Float()), sa.column("unsure", sa.Boolean()), sa.column("context", sa.JSON()),
        *(sa.column(name, kind) for name, kind in WITHHELD),
    )
    op.execute(
        predictions.update().where(predictions.c.looks_dermoscopic.is_(False)).values(
            refusal="not_dermoscopic", risk_spread=None, unsure=None, context=sa.null(),
            **{name: sa.null() for name, _ in WITHHELD},
        )
    )


def downgrade() -> None:
    op.execute("DELETE FROM predictions WHERE melanoma_risk IS NULL")  # the old schema cannot hold a refused row
    with op.batch_alter_table("predictions") as batch:
        for name, kind in WITHHELD:
            batch.alter_column(name, existing_type=kind, nullable=False)
        batch.drop_column("refusal")
