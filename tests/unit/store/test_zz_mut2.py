import threading
from sqlalchemy import text
from xdsi.store import migrations
from xdsi.store.schema import make_engine

def test_mutant(postgresql, monkeypatch):
    real = migrations.upgrade
    def no_lock(connection, revision="head"):
        from alembic import command
        command.upgrade(migrations.config(connection), revision)
    monkeypatch.setattr(migrations, "upgrade", no_lock)
    url = postgresql.create_database()
    start = threading.Barrier(4); errors = []
    def w():
        start.wait()
        try: make_engine(url).dispose()
        except BaseException as e: errors.append(type(e).__name__)
    ts = [threading.Thread(target=w) for _ in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    assert errors == []
