"""Corrections store: tasks, regions (with the prediction the annotator saw), training marks.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "osprey_tasks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("image_ref", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_path", sa.Text, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "task_id", name="uq_osprey_tasks_project_task"),
    )
    op.create_table(
        "osprey_regions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_pk", sa.Integer, sa.ForeignKey("osprey_tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("annotation_id", sa.String(64), nullable=False),
        sa.Column("region_id", sa.String(128), nullable=False),
        sa.Column("rle", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("texts", sa.JSON, nullable=False),
        sa.Column("short", sa.Text),
        sa.Column("detailed", sa.Text),
        sa.Column("annotator", sa.String(255)),
        sa.Column("annotated_at", sa.DateTime(timezone=True)),
        sa.Column("tool_updated_at", sa.DateTime(timezone=True)),
        sa.Column("predicted_version", sa.String(255)),
        sa.Column("predicted_label", sa.Text),
        sa.Column("predicted_score", sa.Float),
        sa.Column("accepted", sa.Boolean),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "task_id", "annotation_id", "region_id",
                            name="uq_osprey_regions_identity"),
    )
    op.create_index("ix_osprey_regions_task_pk", "osprey_regions", ["task_pk"])
    op.create_index("ix_osprey_regions_project_changed", "osprey_regions", ["project_id", "changed_at"])
    op.create_index("ix_osprey_regions_project_annotation", "osprey_regions", ["project_id", "annotation_id"])
    op.create_table(
        "osprey_training_marks",
        sa.Column("project_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(255), primary_key=True),
        sa.Column("cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dataset_fingerprint", sa.String(128)),
        sa.Column("n_examples", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("osprey_training_marks")
    op.drop_index("ix_osprey_regions_project_annotation", "osprey_regions")
    op.drop_index("ix_osprey_regions_project_changed", "osprey_regions")
    op.drop_index("ix_osprey_regions_task_pk", "osprey_regions")
    op.drop_table("osprey_regions")
    op.drop_table("osprey_tasks")
