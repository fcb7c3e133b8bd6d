# Airflow 3.3.2 with dual-deploy's requirements: `docker compose up` (see docker-compose.yaml).
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements.txt /opt/dual-deploy/requirements.txt
# The base image pins Airflow via its constraints; install our exact pins on top.
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /opt/dual-deploy/requirements.txt
ENV PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins
