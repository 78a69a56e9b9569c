{#
  What the Spark target (RECSYS_WAREHOUSE=spark, profiles.yml `spark`) needs beyond the
  dispatched expressions in cross_db.sql and user_history.sql.
#}


{#
  Model contracts: dbt checks a contract by casting NULL to each column's declared
  data_type on the target and comparing the result with the model's own schema. The .yml
  files declare DuckDB's spellings (the default warehouse), which Spark does not parse
  (`varchar` without a length, `integer[]`), so they are translated to Spark's types first;
  the comparison itself is unchanged.
#}
{% macro spark__get_empty_schema_sql(columns) %}
  {%- set spark_types = {'varchar': 'string', 'integer': 'int', 'integer[]': 'array<int>'} -%}
  {%- set translated = {} -%}
  {%- for name in columns -%}
    {%- set column = columns[name].copy() if columns[name] is mapping else columns[name] -%}
    {%- if column['data_type'] is defined and column['data_type'] is not none -%}
      {%- do column.update({'data_type': spark_types.get(column['data_type'].strip().lower(), column['data_type'])}) -%}
    {%- endif -%}
    {%- do translated.update({name: column}) -%}
  {%- endfor -%}
  {{ return(dbt.default__get_empty_schema_sql(translated)) }}
{% endmacro %}


{#
  Unit-test fixtures: dbt-spark writes an array value as given (`cast([1, 2] as array<int>)`),
  which Spark does not parse; the fixtures use DuckDB's list literal `[1, 2]`. Spark spells
  it `array(1, 2)`. Everything else is dbt-spark's own cast.
#}
{% macro spark__safe_cast(field, type) %}
  {%- set nested = type.lower().startswith('struct') or type.lower().startswith('array') or type.lower().startswith('map') -%}
  {%- set field_clean = field.strip('"').strip("'") if (nested and field is string) else field -%}
  {%- if type.lower().startswith('array') and field_clean is string and field_clean.strip().startswith('[') and field_clean.strip().endswith(']') -%}
    {%- set field_clean = 'array(' ~ field_clean.strip()[1:-1] ~ ')' -%}
  {%- endif -%}
  cast({{ field_clean }} as {{ type }})
{% endmacro %}
