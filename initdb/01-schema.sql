-- The users table, generated from models.py; do not edit (test_main.py checks it):
-- python -c 'import test_main as t; print(t.schema_sql(), end="")' > initdb/01-schema.sql
CREATE TABLE users (
	id BIGINT NOT NULL AUTO_INCREMENT, 
	email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	email_key VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	is_active BOOL NOT NULL, 
	created_at DATETIME(6) NOT NULL, 
	updated_at DATETIME(6) NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (email_key)
)CHARSET=utf8mb4 COLLATE utf8mb4_bin;
