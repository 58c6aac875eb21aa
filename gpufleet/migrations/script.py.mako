"""${message}

Revision ${up_revision}, after ${down_revision | comma,n}, written ${create_date}.
"""

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    # explicit op calls, the tables as state.py now defines them; `with op.batch_alter_table(...)`
    # for anything SQLite's ALTER TABLE cannot do (drop or change a column, add a constraint)
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
