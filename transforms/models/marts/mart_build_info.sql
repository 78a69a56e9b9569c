-- one row: the dbt vars this build of the marts was made with. Downstream code (snapshot
-- meta, contract bounds, model lineage) reads the split from here, never from its own
-- environment, so a per-run override is labelled and checked as what was built.
{{ recsys.validate_vars() }}

with

build_vars as (

    select
        '{{ var("split") }}' as split,
        {{ var('valid_frac') }} as valid_frac,
        {{ var('test_frac') }} as test_frac,
        {{ var('split_seed') }} as split_seed,
        {{ var('history_len') }} as history_len

),

final as (

    select
        {{ dbt.cast('split', dbt.type_string()) }} as split,
        {{ dbt.cast('valid_frac', recsys.type_double()) }} as valid_frac,
        {{ dbt.cast('test_frac', recsys.type_double()) }} as test_frac,
        {{ dbt.cast('split_seed', dbt.type_bigint()) }} as split_seed,
        {{ dbt.cast('history_len', dbt.type_int()) }} as history_len
    from build_vars

)

select * from final
