# API image: gunicorn serves app:app on 0.0.0.0:8000 as an unprivileged user.
# Needs at run time: JWT_SECRET_KEY (>= 32 bytes), ADMIN_TOKEN, and REDIS_URL when
# WEB_CONCURRENCY > 1 (the default, 2); DATABASE_URL for PostgreSQL, else SQLite in /app/data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# The code stays root-owned (read-only to the app); only /app/data is writable (mount a volume there).
RUN groupadd --system app \
    && useradd --system --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/data \
    && chown app:app /app/data
COPY . .

ENV FLASK_ENV=production \
    WEB_CONCURRENCY=2 \
    DB_PATH=/app/data/ratelimiter.db \
    LOG_DIR=/app/data/logs

USER app
EXPOSE 8000

# slim has no curl: probe /health with the standard library (urlopen raises on a non-2xx answer).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# gunicorn takes its worker count from WEB_CONCURRENCY, and the app reads the same variable,
# so both agree on how many workers share the limiter store. gunicorn.conf.py sets the worker
# class that slow or half-open clients cannot stall, and redacts credentials from every log line
# (the access log on stdout included). No control socket: nothing in the container manages
# gunicorn at run time, and its default path ($HOME/.gunicorn) is not writable.
CMD ["gunicorn", "--config", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "--no-control-socket", "--access-logfile", "-", "app:app"]
