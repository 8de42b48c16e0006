# The service, served by gunicorn with gunicorn.conf.py: `docker build -t users-api .`
# The Python the tests run on (3.11), on Debian slim, pinned to a patch release; pin the digest
# too (python:3.11.14-slim-trixie@sha256:...) where builds must be reproducible to the byte.
FROM python:3.11.14-slim-trixie

# No .pyc files written next to the code at run time; logs leave at once, unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies in a layer of their own, rebuilt only when requirements.txt changes.
# Only the run-time packages: the test and check tools (requirements-dev.txt) stay out of the image.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# A user without privileges, owning none of the code: a hole in the app cannot rewrite it.
# It has a home for gunicorn's control socket (~/.gunicorn). USER by number, so that an
# orchestrator can verify it is not root (runAsNonRoot) without reading /etc/passwd.
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
# Only the service's modules reach the build context (.dockerignore), never a test or a .env.
COPY *.py ./
# The schema's revisions: compose's migrate service runs `alembic upgrade head` from this image.
COPY alembic.ini ./
COPY migrations/ migrations/
USER 10001:10001

EXPOSE 8000
# /livez, the liveness probe: an orchestrator that acts on this (Swarm replaces an unhealthy
# container) must not restart every replica when the database is down. compose.yaml checks
# /readyz instead, where unhealthy only means "send no traffic".
# No curl in slim images; Python's urllib fails on anything but a 2xx, and on a timeout.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/livez', timeout=2)"]

CMD ["gunicorn", "--config", "gunicorn.conf.py", "main:app"]
