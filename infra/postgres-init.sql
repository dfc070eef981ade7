-- One server, two databases: MLflow's registry and Prefect's state.
CREATE DATABASE prefect OWNER mlflow;
