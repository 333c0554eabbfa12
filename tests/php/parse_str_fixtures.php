<?php
// Generates tests/fixtures/parse_str.json: what PHP's own parse_str builds for each case.
//
//   php tests/php/parse_str_fixtures.php > tests/fixtures/parse_str.json
//
// Each case is a raw body; "php" is json_encode((object) parse_str(body)), the top level forced
// to an object (listener.parse_form always returns a dict). test_parse_form.py compares
// listener.parse_form with it, and regenerates this file with php-cli to prove it current.
// Cases marked "limit" go past max_input_vars or max_input_nesting_level, where PHP drops data
// silently and the listener refuses the request instead.

ini_set('max_input_vars', '1000');
ini_set('max_input_nesting_level', '64');
error_reporting(E_ALL & ~E_WARNING);

$cases = [
    // Lists only for keys 0..n-1 in insertion order.
    ['list', 'a[0]=x&a[1]=y'],
    ['list-out-of-order', 'a[1]=x&a[0]=y'],
    ['list-gap', 'a[0]=1&a[1]=2&a[3]=3'],
    ['append', 'a[]=1&a[]=2'],
    ['append-after-largest', 'a[]=1&a[]=2&a[5]=3&a[]=4'],
    ['append-after-string-key', 'a[x]=1&a[]=2'],
    ['append-after-negative', 'a[-5]=x&a[]=y'],
    ['append-space', 'a[ ]=1&a[ ]=2'],
    ['append-encoded-space', 'a[%20]=1'],
    ['append-past-int64-max', 'a[9223372036854775807]=1&a[]=2'],
    ['append-after-int64-min', 'a[-9223372036854775808]=1&a[]=2'],
    ['append-nested', 'a[][x]=1&a[][x]=2'],
    ['append-deep', 'a[b][]=1&a[b][]=2&a[c][][d]=3'],
    // Integer-looking keys PHP keeps as strings.
    ['int-like-strings', 'a[01]=1&a[-0]=2&a[ 1]=3&a[1 ]=4'],
    ['int64-bounds', 'a[9223372036854775807]=1&a[9223372036854775808]=2&a[-9223372036854775809]=3'],
    ['twenty-digits', 'a[12345678901234567890]=1&a[]=2'],
    ['zero', 'a[0]=z&a[]=n'],
    // Brackets: unbalanced, trailing, nested.
    ['text-after-group', 'a[b]c[d]=1'],
    ['bracket-in-key', 'a[[b]]=1'],
    ['unclosed-later-group', 'a[b][c=1'],
    ['unclosed-after-closed', 'a[x][=1'],
    ['extra-close', 'a[b]]=1'],
    ['bracket-inside-key', 'a[x[y][z]=1'],
    ['space-before-key', 'a[ x]=1'],
    ['space-in-group', 'a[x y]=1&a[x.y]=2'],
    // Empty names and leading spaces.
    ['empty-names', '=1&[a]=2&[]=3&b=4'],
    ['leading-space', ' a=1&  b[c]=2'],
    ['space-then-bracket', '  [a]=1&c=3'],
    // Replacement and ordering.
    ['last-duplicate-wins', 'a=1&b=2&a=3'],
    ['scalar-to-array', 'a=1&a[b]=2'],
    ['array-to-scalar-and-back', 'a[b]=1&a=2&a[c]=3'],
    ['array-to-scalar', 'a=1&a[b]=2&a=3'],
    ['append-then-index', 'a[]=1&a[0][b]=2'],
    ['list-item-replaced', 'f[0][id]=1&f[0][name]=x&f[0]=y&f[0][z]=2'],
    // A variable first reached through a nested name (the parser's fast path makes it).
    ['nested-first', 'f[0][id]=1&f[1][id]=2&g[x][y]=3&g[x][z]=4'],
    ['nested-first-over-scalar', 'f=s&f[0][id]=1&f[1][id]=2'],
    ['nested-first-leading-space', ' f[0][id]=1&  f[1][id]=2'],
    ['nested-first-nul-in-name', 'f%00x[0][id]=1&g[0%00][id]=2&g[1][id]=3'],
    ['nested-first-append', 'f[][id]=1&f[0][id]=2&f[][id]=3'],
    ['nested-first-unclosed', 'f[0[id]=1&f[0][id]=2'],
    ['keeps-position', 'a[x]=1&a[y]=2&a[x]=3'],
    // Decoding.
    ['plus-is-space', 'a=b+c&d+e=f'],
    ['encoded-plus', 'a=b%2Bc'],
    ['invalid-escapes', 'a=%zz%4&b=%&c=100%&d=%%41'],
    ['lowercase-escapes', 'a=%c3%a9&b%5bx%5d=1'],
    ['encoded-separators', 'a=x%26y%3Dz&b%3Dc=1&d%26e=2'],
    ['raw-equals-in-value', 'a=b=c&d==e'],
    ['no-equals', 'x&y=&z'],
    ['semicolon-is-not-a-separator', 'a=1;b=2'],
    ['empty-tokens', '&&a=1&&&b=2&'],
    ['nul-cuts-name', 'a%00b=1&c[x%00y]=2&d=v%00w'],
    ['newlines', "a=line1%0D%0Aline2&b=raw\r\nc"],
    ['utf8', 'name=Andr%C3%A9&city=%E6%9D%B1%E4%BA%AC&emoji=%F0%9F%98%80'],
    ['invalid-utf8', 'a=%FF&b%FE=%E2%82&c=%C3%A9'],
    ['control-bytes', 'a=%01%02%03&b%01=%14'],
    ['numeric-top-level', '0=a&1=b&01=c'],
    // Dots and spaces in top-level names are kept by the listener, mangled by PHP.
    ['dot-in-name', 'a.b=1&c d=2'],
    ['unclosed-first-group', 'a[b=1'],
    ['unclosed-with-dots', 'a.b c[d=1'],
    ['empty', ''],
];

// Limits: more than max_input_vars, deeper than max_input_nesting_level.
$many = [];
for ($i = 0; $i < 1001; $i++) { $many[] = "v$i=$i"; }
$cases[] = ['limit-params-1001', implode('&', $many), 'limit'];
$cases[] = ['params-1000', implode('&', array_slice($many, 0, 1000))];
$cases[] = ['params-1000-with-empty-tokens', '&&' . implode('&', array_slice($many, 0, 1000)) . '&&'];
$cases[] = ['depth-64', 'a' . str_repeat('[x]', 64) . '=1&b=2'];
$cases[] = ['limit-depth-65', 'a' . str_repeat('[x]', 65) . '=1&b=2', 'limit'];
$cases[] = ['limit-depth-65-unclosed', 'a' . str_repeat('[x]', 64) . '[y=1&b=2', 'limit'];

// Realistic Vbout calls, encoded as PHP encodes them.
function vbout_contact($n, $fields, $activities) {
    $contact = [
        'transactionid' => (string)(123456789 + $n),
        'contact' => ['id' => (string)(5000 + $n), 'email' => "contact$n@example.com",
                      'phone' => '+1 555 010' . $n, 'profile_url' => "https://app.vbout.com/Contact/$n"],
        'fields' => [],
        'campaigns-opened' => [], 'links-clicked' => [], 'pages-visited' => [],
        'automation-triggered' => [], 'goals-reached' => [], 'webhooks-triggered' => [],
        'lead-score' => [], 'lead-status' => ['score' => '42', 'label' => 'Hot'],
    ];
    $names = ['First Name', 'Last Name', 'Company', 'Country', 'City', 'Job Title', 'Phone', 'Website',
              'Notes', 'Source'];
    $values = ['Ana', 'Müller', 'Acme & Co.', 'US', 'São Paulo', 'CEO / Founder', '+1 (555) 010-0000',
               'https://example.com/?a=1&b=2', "Line one\nLine two", '100% organic'];
    for ($i = 0; $i < $fields; $i++) {
        $contact['fields'][] = ['id' => (string)(100 + $i), 'name' => $names[$i % 10], 'value' => $values[$i % 10]];
    }
    for ($i = 0; $i < $activities; $i++) {
        $contact['campaigns-opened'][] = ['id' => (string)(700 + $i), 'name' => "Newsletter #$i",
                                          'open_date' => '2026-11-2' . ($i % 10) . ' 10:00:00'];
        $contact['links-clicked'][] = ['url' => "https://example.com/offer?id=$i&utm_source=vbout", 'clicks' => (string)($i + 1)];
        $contact['pages-visited'][] = ['page' => "https://example.com/page/$i", 'visit_date' => '2026-11-26 09:0' . ($i % 10) . ':00'];
        $contact['automation-triggered'][] = ['id' => (string)(40 + $i), 'name' => 'Welcome journey', 'trigger_date' => '2026-11-26 08:00:00'];
        $contact['goals-reached'][] = ['id' => (string)(9 + $i), 'name' => 'Signed up', 'reach_date' => '2026-11-26 08:30:00'];
        $contact['webhooks-triggered'][] = ['id' => (string)(3 + $i), 'name' => 'CRM sync', 'trigger_date' => '2026-11-26 08:31:00'];
        $contact['lead-score'][] = ['id' => (string)(1 + $i), 'name' => 'Engagement', 'score' => (string)(10 * $i), 'score_date' => '2026-11-26 08:32:00'];
    }
    return $contact;
}
$cases[] = ['vbout-typical', http_build_query(vbout_contact(1, 10, 3))];
$cases[] = ['vbout-minimal', http_build_query(['transactionid' => '1', 'contact' => ['id' => '9', 'email' => 'a@b.c']])];
$cases[] = ['vbout-rfc3986', http_build_query(vbout_contact(2, 10, 2), '', '&', PHP_QUERY_RFC3986)];
$cases[] = ['vbout-many-fields', http_build_query(vbout_contact(3, 150, 20))];
$cases[] = ['vbout-numeric-prefix', http_build_query(['a', 'b', 'x' => ['c']], 'p_')];
$cases[] = ['vbout-keyed-by-id', http_build_query(['fields' => ['17' => ['name' => 'Country', 'value' => 'US'],
                                                                '4' => ['name' => 'City', 'value' => 'Austin']]])];

$out = [];
foreach ($cases as $case) {
    $body = $case[1];
    $result = [];
    parse_str($body, $result);
    $out[] = [
        'id' => $case[0],
        'body_b64' => base64_encode($body),
        'limit' => isset($case[2]),
        'php' => (object)$result,
    ];
}
echo json_encode(['php_version' => PHP_VERSION, 'cases' => $out],
                 JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
