"""What a poem is: the four forms, the vocabulary, the 平水韵 tables (`rhymes`, plain Python; `prosody`, the
same as a vocabulary's tensors), the rules a decoding row follows (`constraints`), the judge that checks a
generated poem (`judge`) and the reader of any pasted poem's meter (`meter`, behind /check)."""
