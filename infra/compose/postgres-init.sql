-- One PostgreSQL server for the team: MLflow's tracking store and model registry (`mlflow`, made by the
-- image from POSTGRES_DB), MLflow's users and permissions (`mlflow_auth`) and Prefect's state (`prefect`).
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
