# Perspective coordinator image: flower-superlink + `perspective coordinator serve` (one image,
# two services in compose.yaml). CPU torch; build with: docker build -f deploy/coordinator.Dockerfile .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared_model shared_model
COPY coordinator coordinator
COPY participant participant
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir . "psycopg[binary]>=3.1"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/perspective --create-home perspective
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/var/lib/perspective/flwr PYTHONUNBUFFERED=1
USER perspective
WORKDIR /var/lib/perspective
EXPOSE 8080 9091
# The API speaks TLS with the network CA (serve --secrets-dir); compose overrides this per service.
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import ssl, urllib.request as u; u.urlopen('https://localhost:8080/api/v1/status', timeout=4, context=ssl.create_default_context(cafile='/etc/perspective/tls/ca.crt'))"
CMD ["perspective", "coordinator", "--help"]
