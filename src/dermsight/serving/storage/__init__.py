"""Where the web app keeps patients, lesions, images and predictions.

Rows live in a SQL database: embedded SQLite (WAL, foreign keys on) by default, or
PostgreSQL by URL; image and heat-map files live under a storage directory, named by the
SHA-256 of their content only, so identical uploads share one file. Files are written
atomically before the rows that point to them commit; one call = one transaction; a file
is removed once no row refers to it. A crash between a file's write and its row's commit
leaves an orphan file, never a row without its file: ``Storage.check_files`` (run when
the app starts) removes orphans and reports rows whose file has gone missing.

- :mod:`.models`: the tables (SQLAlchemy ORM), including API keys (SHA-256 hashes only),
  and the ranking of a patient's lesions.
- :mod:`.database`: engines (SQLite pragmas) and the Alembic migrations in
  ``serving/migrations``.
- :mod:`.files`: the content-addressed file store and its cross-process lock.
- :mod:`.repository`: :class:`~.repository.Storage`, the one data-access object the app,
  the scorer and the CLI use.
"""
