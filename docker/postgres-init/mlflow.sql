-- MLflow gets its own database: Optuna and MLflow both keep an alembic_version table.
CREATE DATABASE mlflow OWNER kdsearch;
