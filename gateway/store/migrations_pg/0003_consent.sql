-- Consent: who has withdrawn it (nothing of them crosses a link), and who
-- wrote which message (so a withdrawal can remove every copy).
CREATE TABLE consent (
    actor   TEXT PRIMARY KEY,
    state   TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);

CREATE TABLE authorship (
    author  TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (author, message)
);
