"""What a poem is: the four forms, the vocabulary, the 平水韵 tables, the rules a decoding row follows
(`constraints`) and the judge that checks a finished poem (`judge`). No torch model here."""
