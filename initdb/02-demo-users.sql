-- A few demo users, loaded with the schema when the database volume is first created.
-- The same users main.py gives a fresh development database (DEMO_USERS); times are UTC.
INSERT INTO users (email, email_key, name, is_active, created_at, updated_at, version) VALUES
    ('ada@example.com', 'ada@example.com', 'Ada Lovelace', TRUE, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1),
    ('grace@example.com', 'grace@example.com', 'Grace Hopper', TRUE, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1),
    ('alan@example.com', 'alan@example.com', 'Alan Turing', TRUE, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1);
