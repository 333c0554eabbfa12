<?php
// The PHP peer for tests/bench/apache_bench.py: what a PHP listener for Vbout typically is.
// $_POST as PHP parses it, one INSERT into SQLite through PDO, durably (WAL, synchronous=FULL).
header('Content-Type: application/json');
if (!hash_equals(getenv('VBOUT_SECRET') ?: 'x', $_GET['key'] ?? '')) {
    http_response_code(403);
    echo '{"ok": false, "error": "The key is missing or wrong.", "status": 403}';
    exit;
}
$db = new PDO('sqlite:' . getenv('VBOUT_PHP_DB'));
$db->exec('PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000');
$db->exec('CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, transaction_id TEXT UNIQUE,
           received_at TEXT, payload TEXT, raw_body BLOB, contact_email TEXT)');
$insert = $db->prepare('INSERT OR IGNORE INTO events (transaction_id, received_at, payload, raw_body, contact_email)
                        VALUES (?, ?, ?, ?, ?)');
$insert->execute([$_POST['transactionid'] ?? null, gmdate('c'), json_encode($_POST),
                  file_get_contents('php://input'), $_POST['contact']['email'] ?? null]);
echo json_encode(['ok' => true, 'event_id' => (int)$db->lastInsertId(), 'duplicate' => false]);
