"""Your models. ``create_app`` imports this module, so ``flask db migrate`` sees them.

Subclass :class:`app.services.db_service.Base` (not ``db.Model``, which mypy
cannot check), name the table, and type the columns::

    from sqlalchemy import String
    from sqlalchemy.orm import Mapped, mapped_column

    from app.services.db_service import Base


    class Note(Base):
        __tablename__ = "note"

        id: Mapped[int] = mapped_column(primary_key=True)
        text: Mapped[str] = mapped_column(String(500))

then ``flask db migrate -m "add note"`` and ``flask db upgrade``. Models kept
in other modules must be imported here. None ships: a model here would give
every app built from this project a table it did not ask for.
"""

from __future__ import annotations
