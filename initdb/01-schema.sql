-- The tables, generated from models.py; do not edit (test_main.py checks it):
-- python -c 'import test_main as t; print(t.schema_sql(), end="")' > initdb/01-schema.sql
CREATE TABLE idempotency_keys (
	id BIGINT NOT NULL AUTO_INCREMENT, 
	owner VARCHAR(32) NOT NULL, 
	`key` VARCHAR(255) NOT NULL, 
	fingerprint VARCHAR(64) NOT NULL, 
	status INTEGER NOT NULL, 
	location VARCHAR(64), 
	etag VARCHAR(32), 
	body TEXT NOT NULL, 
	created_at DATETIME(6) NOT NULL, 
	CONSTRAINT pk_idempotency_keys PRIMARY KEY (id), 
	CONSTRAINT uq_idempotency_keys_owner_key UNIQUE (owner, `key`)
)CHARSET=utf8mb4 COLLATE utf8mb4_bin;
CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at);
CREATE TABLE users (
	id BIGINT NOT NULL AUTO_INCREMENT, 
	email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	email_key VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	is_active BOOL NOT NULL, 
	created_at DATETIME(6) NOT NULL, 
	updated_at DATETIME(6) NOT NULL, 
	version INTEGER NOT NULL, 
	CONSTRAINT pk_users PRIMARY KEY (id), 
	CONSTRAINT uq_users_email_key UNIQUE (email_key)
)CHARSET=utf8mb4 COLLATE utf8mb4_bin;
